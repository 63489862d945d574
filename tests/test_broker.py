"""The broker connection over a real Redis, and a real Sentinel: the URL's scheme picks the
transport, Redis channels share their client, and a lost broker closes without an
AttributeError."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from kombu.common import ignore_errors
from kombu.transport import pyamqp

from soak.support import free_port
from tests.conftest import wait_for
from worker.broker import (
    BrokerConnection,
    RedisChannel,
    RedisTransport,
    SentinelChannel,
    SentinelTransport,
)
from worker.redis_server import RedisServer, server_binary

MASTER = "mtk-broker"


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/0", RedisTransport),
        ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required", RedisTransport),
        ("sentinel://127.0.0.1:26379", SentinelTransport),
        ("amqp://guest:guest@127.0.0.1:5672//", pyamqp.Transport),  # kombu's own
    ],
)
def test_the_urls_scheme_picks_the_transport_and_stays_its_name(
    url: str, transport: type[Any]
) -> None:
    connection = BrokerConnection(url)

    assert type(connection.transport) is transport
    assert urlsplit(connection.as_uri()).scheme == urlsplit(url).scheme


def _client_kept_per_pool(connection: BrokerConnection) -> tuple[bool, bool]:
    channel = connection.default_channel
    first = channel._create_client()
    shared = first is channel._create_client()
    channel._pool = None  # as after a reconnect
    return shared, channel._create_client() is not first


def test_a_redis_channel_keeps_one_client_per_connection_pool(redis_server: RedisServer) -> None:
    with BrokerConnection(redis_server.url) as connection:
        queue = connection.SimpleQueue("broker-shared")
        queue.put({"n": 1})
        assert queue.get(timeout=5).payload == {"n": 1}
        assert isinstance(connection.default_channel, RedisChannel)
        # Not one client built per publish and ack; a new one with a new pool.
        assert _client_kept_per_pool(connection) == (True, True)


def test_a_connection_collected_after_a_lost_broker_closes_without_an_attribute_error(
    redis_server: RedisServer,
) -> None:
    connection = BrokerConnection(redis_server.url)
    queue = connection.SimpleQueue("broker-lost")
    queue.put({"n": 1})
    queue.get(timeout=5)  # delivered, never acked: its ack failed with the broker gone
    # What Connection.collect() leaves after a lost broker when closing the channel failed (a
    # BRPOP in flight on the dead socket): the channel open, its transport detached.
    connection._do_close_transport()

    # Before: AttributeError("'NoneType' object has no attribute 'hostname'"), which Celery
    # reports as "Unrecoverable error" and stops the worker on.
    ignore_errors(connection, connection.close)  # as Celery's consumer does to reconnect


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """A Redis Sentinel watching the test Redis as ``MASTER``; its URL."""
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {redis_server.port} 1\n"
    )
    process = subprocess.Popen(
        [server_binary(), str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        watcher = redis.Redis(port=port)
        wait_for(lambda: _master(watcher), message="the sentinel to know its master")
        watcher.close()
        yield f"sentinel://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _master(watcher: redis.Redis) -> Any:
    try:
        return watcher.sentinel_get_master_addr_by_name(MASTER)
    except redis.ConnectionError:
        return None


def test_a_sentinel_channel_reaches_the_master_and_keeps_one_client_per_pool(
    sentinel: str,
) -> None:
    options = {"master_name": MASTER}
    with BrokerConnection(sentinel, transport_options=options) as connection:
        queue = connection.SimpleQueue("broker-sentinel")
        queue.put({"n": 2})
        assert queue.get(timeout=5).payload == {"n": 2}
        assert isinstance(connection.default_channel, SentinelChannel)
        assert _client_kept_per_pool(connection) == (True, True)
