"""The embedded Redis: durable, local, shared, the service's alone; warnings for risky Redis."""

from __future__ import annotations

import logging
import secrets
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, wait_for
from worker.redis_server import (
    CONFIG_FILE,
    PASSWORD_FILE,
    RedisServer,
    RedisUnavailableError,
    ensure_embedded,
    server_binary,
    warn_if_evicting,
    warn_without_persistence,
)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data_dir, port = tmp_path / "var", free_port()
    yield data_dir, port
    RedisServer(data_dir, port).stop()


@pytest.fixture
def volatile_server(tmp_path: Path) -> Iterator[int]:
    """A redis-server without append-only persistence, as many hosted ones are."""
    port = free_port()
    process = subprocess.Popen(
        [
            server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "no",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for(RedisServer(tmp_path, port).ping, message="the volatile redis-server to answer")
    yield port
    process.terminate()
    process.wait(timeout=10)


def _config(client: redis.Redis, name: str) -> str:
    return client.config_get(name)[name]


def _anonymous(port: int, command: bytes) -> bytes:
    """What Redis answers an inline ``command`` sent without a password, as any local user can."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(command + b"\r\n")
        return connection.recv(256)


def test_the_servers_command_is_durable_and_local(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert _config(client, "appendonly") == "yes"
        assert _config(client, "appendfsync") == "always"
        assert _config(client, "save") == ""  # no snapshots beside the append-only file
        assert _config(client, "rdbcompression") == "no"  # ciphertext does not compress
        assert _config(client, "bind") == "127.0.0.1"
        assert _config(client, "dir") == str(tmp_path / "redis")
        client.close()
    finally:
        server.stop()


def test_ensure_embedded_starts_a_durable_local_daemon_reuses_it_and_stops(
    embedded: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, port = embedded
    caplog.set_level(logging.WARNING, logger="worker.redis_server")

    url = ensure_embedded(data_dir, port)

    password = (data_dir / PASSWORD_FILE).read_text().strip()
    assert url == f"redis://:{password}@127.0.0.1:{port}/0"
    assert "starting the embedded Redis" in caplog.text
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.info("persistence")["aof_enabled"] == 1
    info = client.info("server")
    assert info["config_file"] == str(data_dir / CONFIG_FILE)
    assert int((data_dir / "redis.pid").read_text()) == info["process_id"]

    caplog.clear()
    assert ensure_embedded(data_dir, port) == url
    assert client.info("server")["process_id"] == info["process_id"]
    assert "starting" not in caplog.text
    client.close()

    server = RedisServer(data_dir, port)  # stops it without knowing the password
    server.stop()
    assert not RedisServer.embedded(data_dir, port).ping()
    assert not (data_dir / "redis.pid").exists()


def test_the_embedded_redis_wants_its_password_and_refuses_config_module_and_debug(
    embedded: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, port = embedded
    caplog.set_level(logging.DEBUG)

    url = ensure_embedded(data_dir, port)

    assert _anonymous(port, b"PING").startswith(b"-NOAUTH")
    assert _anonymous(port, b"SET planted 1").startswith(b"-NOAUTH")
    client = redis.Redis.from_url(url)
    for command in (("CONFIG", "SET", "dir", "/etc"), ("MODULE", "LIST"), ("DEBUG", "SLEEP", "0")):
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)
    assert client.ping()
    pid = client.info("server")["process_id"]
    client.close()

    password = (data_dir / PASSWORD_FILE).read_text().strip()
    assert len(password) >= 32
    for name in (PASSWORD_FILE, CONFIG_FILE):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert password not in " ".join(RedisServer.embedded(data_dir, port).command(daemonize=True))
    assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password not in caplog.text


def test_an_open_redis_of_an_earlier_version_is_refused_and_its_data_kept_after_a_restart(
    embedded: tuple[Path, int],
) -> None:
    data_dir, port = embedded
    earlier = RedisServer(data_dir, port).start(daemonize=True)  # as earlier versions ran it
    redis.Redis.from_url(earlier.url).set("kept", "yes")

    with pytest.raises(RedisUnavailableError, match="without a password") as refused:
        ensure_embedded(data_dir, port)
    assert f"redis-cli -p {port} shutdown" in str(refused.value)

    earlier.stop()
    (data_dir / PASSWORD_FILE).unlink()  # a data dir as an earlier version left it
    client = redis.Redis.from_url(ensure_embedded(data_dir, port))
    assert client.get("kept") == b"yes"
    client.close()
    assert _anonymous(port, b"GET kept").startswith(b"-NOAUTH")


def test_a_redis_with_another_password_on_the_port_is_refused(
    embedded: tuple[Path, int], tmp_path: Path
) -> None:
    data_dir, port = embedded
    other = RedisServer(tmp_path / "other", port, secrets.token_hex(16)).start()
    try:
        with pytest.raises(RedisUnavailableError, match="refuses the password in"):
            ensure_embedded(data_dir, port)
    finally:
        other.stop()


def test_a_redis_without_append_only_persistence_is_warned_about(
    volatile_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.redis_server")
    password = secrets.token_urlsafe(12)
    client = redis.Redis(port=volatile_server)

    assert warn_without_persistence(client, f"redis://:{password}@127.0.0.1:{volatile_server}/0")

    assert "has no append-only persistence" in caplog.text
    assert "127.0.0.1" in caplog.text
    assert password not in caplog.text
    client.close()


def test_a_redis_that_deletes_keys_when_full_is_warned_about(
    volatile_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.redis_server")
    client = redis.Redis(port=volatile_server)
    client.config_set("maxmemory-policy", "allkeys-lru")

    assert warn_if_evicting(client, f"redis://127.0.0.1:{volatile_server}/0")

    assert "maxmemory-policy allkeys-lru" in caplog.text
    client.close()


def test_our_durable_redis_is_not_warned_about(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.redis_server")
    client = redis.Redis.from_url(redis_server.url)
    assert not warn_without_persistence(client, redis_server.url)
    assert not warn_if_evicting(client, redis_server.url)
    assert caplog.text == ""
    client.close()


def test_a_foreign_volatile_redis_on_the_embedded_port_is_not_used_silently(
    volatile_server: int, tmp_path: Path
) -> None:
    with pytest.raises(RedisUnavailableError, match="without a password"):
        ensure_embedded(tmp_path / "var", volatile_server)
