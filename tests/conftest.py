"""Shared fixtures: a real Redis server, a real Miro sandbox, settings that point at both.

Nothing here mocks the project's own code: every test talks to ``redis-server`` over TCP and
to the sandbox over HTTP. Secrets and keys are generated per run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from cryptography.fernet import Fernet

from settings import Settings
from soak.support import free_port, wait_until
from worker.redis_server import RedisServer
from worker.sandbox import DIALECTS, Sandbox, SandboxConfig
from worker.vault import Vault

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "3458764500000000001"
REDIRECT_URI = "http://127.0.0.1:5000/oauth/callback"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
    """Poll until ``condition()`` is truthy; fail the test with ``message`` at the deadline."""
    try:
        return wait_until(condition, timeout, message)
    except TimeoutError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def client_secret() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def encryption_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


#: Runs a test once in each dialect of the sandbox: ``@EVERY_DIALECT`` over a test that uses
#: ``sandbox``. What Miro answers to a refusal is not documented, and must not matter.
EVERY_DIALECT = pytest.mark.parametrize("dialect", DIALECTS)


@pytest.fixture
def dialect() -> str:
    """How the sandbox words refusals; ``EVERY_DIALECT`` overrides it."""
    return "miro"


@pytest.fixture
def sandbox(client_secret: str, dialect: Any) -> Iterator[Sandbox]:
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=client_secret, dialect=dialect)
    with Sandbox(config) as running:
        yield running


@pytest.fixture
def env(
    tmp_path: Path,
    redis_server: RedisServer,
    sandbox: Sandbox,
    client_secret: str,
    encryption_key: str,
) -> dict[str, str]:
    """The environment a process of the service would get, pointed at the test servers."""
    return {
        "REDIS_URL": redis_server.url,
        "MIRO_CLIENT_ID": CLIENT_ID,
        "MIRO_CLIENT_SECRET": client_secret,
        "MIRO_REDIRECT_URI": REDIRECT_URI,
        "MIRO_API_URL": sandbox.url,
        "MIRO_AUTH_URL": sandbox.url,
        "TOKEN_ENCRYPTION_KEYS": encryption_key,
        "DATA_DIR": str(tmp_path / "var"),
        "HTTP_TIMEOUT": "5",
        "COMMIT_RETRY_SECONDS": "2",
        "LOCK_TTL": "15",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def vault(settings: Settings, redis_client: redis.Redis) -> Vault:
    return Vault.from_settings(settings)


def authorize_code(
    sandbox: Sandbox, vault: Vault, team_id: str | None = None, user_id: str | None = None
) -> str:
    """Walk step 1 of Miro's guide against the sandbox and return the code it redirects with.

    ``user_id`` is a sandbox extension that picks which user approves.
    """
    url = vault.client.authorize_url(state="test-state", team_id=team_id)
    if user_id:
        url += f"&user_id={user_id}"
    response = requests.get(url, allow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["state"] == ["test-state"]
    return query["code"][0]


@pytest.fixture
def connect(sandbox: Sandbox, vault: Vault) -> Callable[..., Any]:
    """Connect a new user through authorize + exchange; returns the stored credential."""

    def connect_user(**extra: str) -> Any:
        return vault.exchange(authorize_code(sandbox, vault, **extra))

    return connect_user


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    """Run ``python -m worker`` as a separate process, as an operator would."""
    return run_module(env, "worker", *args, stdin=stdin)


def run_module(env: dict[str, str], module: str, *args: str, stdin: str | None = None) -> Any:
    """Run ``python -m MODULE ARGS`` with the test environment and wait for it."""
    return run_python(env, "-m", module, *args, stdin=stdin)


def run_python(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    """Run ``python ARGS`` in the project with the test environment and wait for it."""
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
