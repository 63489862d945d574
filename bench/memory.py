"""Memory: Redis bytes per credential, from ``INFO memory`` before and after seeding.

Everything a credential adds counts: its record (key and value), its entry in the due index,
its place in the id index, its share of the state counts. The split comes from ``MEMORY
USAGE`` of a sample of records, of the whole due index and of every key of the id index.
"""

from __future__ import annotations

import random
from typing import Any

import redis

from bench.report import Check, Section, Table
from worker.constants import DUE_INDEX, ID_TEAM_KEY, ID_USER_BUCKET_KEY, credential_key

TARGET_BYTES = 600
SAMPLE = 500


def measure(client: redis.Redis, baseline: int, count: int) -> dict[str, Any]:
    """Bytes per credential now that ``count`` are stored, and where they go."""
    used = int(client.info("memory")["used_memory"])
    members = client.zrandmember(DUE_INDEX, min(SAMPLE, count)) or []
    keys = [credential_key(member.decode()) for member in members]
    record = sum(client.memory_usage(key, samples=0) or 0 for key in keys) / max(1, len(keys))
    index = (client.memory_usage(DUE_INDEX, samples=0) or 0) / count
    ids = id_index_bytes(client) / count
    per_credential = (used - baseline) / count
    return {
        "count": count,
        "used_memory": used,
        "baseline": baseline,
        "per_credential": per_credential,
        "record": record,
        "due_index": index,
        "id_index": ids,
        "other": per_credential - record - index - ids,
        "record_value_bytes": _value_length(client, random.choice(keys)) if keys else 0,
    }


def id_index_bytes(client: redis.Redis) -> int:
    """``MEMORY USAGE`` of the id index: its team sets and its user buckets."""
    return sum(
        keys_bytes(client, pattern)
        for pattern in (ID_TEAM_KEY.format(team="*"), ID_USER_BUCKET_KEY.format(bucket="*"))
    )


def keys_bytes(client: redis.Redis, pattern: str) -> int:
    """``MEMORY USAGE`` of every key ``pattern`` matches, all of it (no sampling)."""
    total = 0
    keys = list(client.scan_iter(pattern, count=10_000))
    for start in range(0, len(keys), 10_000):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 10_000]:
                pipe.memory_usage(key, samples=0)
            total += sum(size or 0 for size in pipe.execute())
    return total


def _value_length(client: redis.Redis, key: str) -> int:
    return int(client.strlen(key))


def section(samples: list[dict[str, Any]]) -> Section:
    rows = [
        [
            s["count"],
            s["per_credential"],
            s["record"],
            s["due_index"],
            s.get("id_index", 0),
            s["other"],
            s["record_value_bytes"],
        ]
        for s in samples
    ]
    checks = [
        Check(
            figure=f"Redis memory per credential at {s['count']:,}",
            value=s["per_credential"],
            unit="bytes",
            target=f"<= {TARGET_BYTES}",
            met=s["per_credential"] <= TARGET_BYTES,
            note=f"record {s['record']:.0f} + due index {s['due_index']:.0f} + id index "
            f"{s.get('id_index', 0):.0f} + other {s['other']:.0f}",
        )
        for s in samples
        if s["count"] >= 100_000 or s is samples[-1]
    ]
    table = Table(
        "Memory (INFO memory used_memory, after minus before seeding)",
        [
            "stored",
            "bytes each",
            "record (key+value)",
            "due index entry",
            "id index",
            "other",
            "record value length",
        ],
        rows,
    )
    return Section("memory", checks, [table], {"samples": samples})
