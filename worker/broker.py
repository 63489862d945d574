"""The broker connection: kombu's, with a channel of this service's for a Redis broker.

The URL's scheme still picks the transport, as in kombu: ``redis://`` and ``rediss://`` get
:class:`RedisTransport`, ``sentinel://`` gets :class:`SentinelTransport`, any other scheme
kombu's own. The choice is made by the app's connection class (:class:`AMQP`, handed to
Celery), not by replacing kombu's classes for the whole process, and not through Celery's
``broker_transport``: that puts the class's import path where the URL's scheme was, in the
worker's banner and logs and for Flower, whose Broker page picks its client by that scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection
from kombu.transport import redis as kombu_redis

if TYPE_CHECKING:  # what the mixin reaches through: the channels it is mixed into
    _Channel = kombu_redis.Channel
else:
    _Channel = object


class SharedClient(_Channel):
    """A Redis channel with one redis-py client per connection pool instead of one per command.

    kombu builds a new client for every publish, every ack and every unacked-message record,
    and each build copies a table of some 170 response callbacks: profiled in a worker, that
    was 7 to 10 % of its CPU per refresh. A client is only a handle on the channel's
    connection pool, safe to share between threads, so one is kept per pool (a fork or a
    reconnect makes a new pool, and with it a new client).

    Once its connection is gone, it refuses to build a pool with a connection error instead
    of kombu's AttributeError: that keeps a worker alive through a Redis restart.
    """

    _shared_client: Any = None

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # Celery, having lost the broker, collects the connection (which detaches the
            # transport and drops the pools) and then closes it; a channel still open puts its
            # unacked messages back, which needs a pool. kombu would build one from no
            # connection at all and fail with an AttributeError, which Celery takes as
            # unrecoverable: the worker stopped for good on a Redis restart. A connection
            # error is what that close ignores; the messages stay in kombu's unacked set, and
            # a claim's lease brings their credentials back anyway.
            raise redis.ConnectionError("the broker connection is closed")
        return super()._get_pool(asynchronous=asynchronous)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class RedisChannel(SharedClient, kombu_redis.Channel):
    """kombu's Redis channel, sharing its client."""


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel


class SentinelChannel(SharedClient, kombu_redis.SentinelChannel):
    """kombu's Redis Sentinel channel, sharing its client."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


#: This service's transport for each URL scheme that has one; kombu's for any other.
TRANSPORTS: dict[str, type[kombu_redis.Transport]] = {
    "redis": RedisTransport,
    "rediss": RedisTransport,
    "sentinel": SentinelTransport,
}


class BrokerConnection(Connection):
    """kombu's connection, with this service's transport for the schemes it has one for.

    The URL's scheme stays the connection's transport name, so the connection reads as
    kombu's does (``as_uri()``, kombu's own ``rediss`` defaults): only the class differs.
    """

    def get_transport_cls(self) -> Any:
        return TRANSPORTS.get(self.transport_cls) or super().get_transport_cls()


class AMQP(CeleryAMQP):
    """Celery's messaging, making every connection of the app a :class:`BrokerConnection`.

    The worker's, beat's, Flower's, ``celery inspect``'s: all come from ``app.connection*()``.
    """

    Connection = BrokerConnection
