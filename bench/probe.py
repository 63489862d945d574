"""Measurements taken inside a service process: beat's scan tick, and forced rotations.

The service reads its settings once per process (``worker.celery`` builds its app when it is
imported), so each measurement runs in a fresh interpreter with the environment of the
benchmark's own Redis and sandbox, exactly like a worker or the CLI would:

    python -m bench.probe scan --repeats 10
    python -m bench.probe forced ID ID ...

and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from worker.constants import DUE_INDEX

#: Ticks run before the timed ones: the first loads scripts and opens connections.
WARMUP_TICKS = 2


def scan_ticks(repeats: int) -> dict[str, Any]:
    """Time the scan as beat runs it, through beat's scheduler, over what is due now.

    Whatever is due when the probe starts is made due again before every tick (the tick
    claims it by pushing it a lease ahead), and the queue is emptied, so every tick claims
    and enqueues the same credentials into an empty queue.
    """
    from tasks import vault  # noqa: PLC0415 - imported with the probe's environment
    from tasks.beat import ScanScheduler  # noqa: PLC0415
    from worker.celery import app  # noqa: PLC0415

    scheduler = ScanScheduler(app=app)
    redis = vault().redis
    queue = app.conf.task_default_queue
    due = redis.zrangebyscore(DUE_INDEX, "-inf", time.time(), withscores=True)
    millis, claimed = [], []
    for tick in range(WARMUP_TICKS + repeats):
        redis.delete(queue)
        if due:
            redis.zadd(DUE_INDEX, dict(due), xx=True)
        started = time.perf_counter()
        report = scheduler.scan()
        elapsed = (time.perf_counter() - started) * 1000
        if tick >= WARMUP_TICKS:
            millis.append(elapsed)
            claimed.append(report.claimed)
    scheduler.close()
    queued = redis.llen(queue)
    redis.delete(queue)
    if due:
        redis.zadd(DUE_INDEX, dict(due), xx=True)
    return {"ms": millis, "claimed": claimed, "queued": queued, "due": len(due)}


def forced(ids: list[str]) -> dict[str, Any]:
    """Time ``rotate ID --wait`` as the CLI does it, in a warm process, one after the other.

    The clock runs from the request (reading the version the requester saw, queueing the
    ``rotate`` task) to the task's result, which the worker sends after the new pair is
    committed; the stored version is then checked.
    """
    from settings import get_settings  # noqa: PLC0415
    from worker.celery import app  # noqa: PLC0415
    from worker.credential import CredentialId  # noqa: PLC0415
    from worker.vault import Vault  # noqa: PLC0415

    vault = Vault.from_settings(get_settings())
    millis, outcomes = [], []
    for text in ids:
        credential_id = CredentialId.parse(text)
        started = time.perf_counter()
        seen = vault.rotator.version_now(credential_id)
        task = app.send_task("tasks.refresh.rotate", args=[text, seen])
        result = task.get(timeout=60)
        millis.append((time.perf_counter() - started) * 1000)
        stored = vault.rotator.version_now(credential_id)
        ok = result["outcome"] == "rotated" and seen is not None and stored == seen + 1
        outcomes.append(result["outcome"] if ok else f"{result['outcome']} (not stored)")
    return {"ms": millis, "outcomes": outcomes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan")
    scan.add_argument("--repeats", type=int, default=10)
    rotate = commands.add_parser("forced")
    rotate.add_argument("ids", nargs="+")
    args = parser.parse_args(argv)
    result = scan_ticks(args.repeats) if args.command == "scan" else forced(args.ids)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
