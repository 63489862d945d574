"""Celery's floor: the bare minimum refresh, run as a Celery task by a real worker.

The task does what ``bench.bare`` does (post the refresh, encrypt the pair, SET one record)
in a worker configured like the service's (threads pool, prefetch, task events, ``-l INFO``),
so the throughput benchmark can split the service's cost per refresh into the bare work,
what Celery adds to any task, and what the service's own rules add (lock, compare-and-swap,
rate limit, incident and outcome bookkeeping)::

    celery -A bench.floor worker --concurrency C
"""

from __future__ import annotations

import json
import os
from functools import cache

import redis
import urllib3
from celery import Celery

from worker.crypto import TokenCipher
from worker.miro import POOL_SIZE

TASK = "bench.floor.refresh"

app = Celery("floor", broker=os.environ.get("REDIS_URL"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    worker_pool="threads",
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_acks_late=False,
)


@cache
def _clients() -> tuple[urllib3.HTTPConnectionPool, redis.Redis, TokenCipher]:
    """One HTTP pool (urllib3's, shared by the threads and called directly, as the service's)
    and one Redis pool.

    Both have room for as many threads as the service's: redis-py refuses a 101st connection
    by default.
    """
    http = urllib3.connection_from_url(os.environ["MIRO_API_URL"], maxsize=POOL_SIZE)
    client = redis.Redis.from_url(os.environ["REDIS_URL"], max_connections=POOL_SIZE)
    return http, client, TokenCipher.from_text(os.environ["TOKEN_ENCRYPTION_KEYS"])


@app.task(name=TASK, ignore_result=True)
def refresh(name: str, refresh_token: str) -> dict[str, str]:
    http, client, cipher = _clients()
    answer = http.request(
        "POST",
        "/v1/oauth/token",
        fields={
            "client_id": os.environ["MIRO_CLIENT_ID"],
            "client_secret": os.environ["MIRO_CLIENT_SECRET"],
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        },
        encode_multipart=False,
        timeout=10,
    ).json()
    pair = json.dumps({"a": answer["access_token"], "r": answer["refresh_token"]})
    client.set(f"floor:{name}", cipher.encrypt(pair.encode()))
    return {"credential_id": name, "outcome": "rotated"}
