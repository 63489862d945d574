"""The embedded Redis: durable, local, shared; and a warning for a Redis that is not durable."""

from __future__ import annotations

import logging
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, wait_for
from worker.redis_server import (
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


def test_ensure_embedded_starts_a_durable_local_daemon_reuses_it_and_stops(
    embedded: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, port = embedded
    caplog.set_level(logging.WARNING, logger="worker.redis_server")

    url = ensure_embedded(data_dir, port)

    assert url == f"redis://127.0.0.1:{port}/0"
    assert "starting the embedded Redis" in caplog.text
    client = redis.Redis.from_url(url, decode_responses=True)
    assert _config(client, "appendonly") == "yes"
    assert _config(client, "appendfsync") == "always"
    assert _config(client, "save") == ""  # no snapshots beside the append-only file
    assert _config(client, "rdbcompression") == "no"  # ciphertext does not compress
    assert _config(client, "bind") == "127.0.0.1"
    assert _config(client, "dir") == str(data_dir)
    pid = client.info("server")["process_id"]
    assert int((data_dir / "redis.pid").read_text()) == pid

    caplog.clear()
    assert ensure_embedded(data_dir, port) == url
    assert client.info("server")["process_id"] == pid
    assert "starting" not in caplog.text
    client.close()

    server = RedisServer(data_dir, port)
    server.stop()
    assert not server.ping()
    assert not (data_dir / "redis.pid").exists()


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
    volatile_server: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    try:
        ensure_embedded(tmp_path / "var", volatile_server)
    except RedisUnavailableError:
        return
    assert "persistence" in caplog.text
