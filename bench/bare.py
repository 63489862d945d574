"""The bare minimum a refresh needs, for the throughput benchmark to compare the service with.

``threads`` threads in one process loop over: POST the refresh to the sandbox (with
urllib3, as the service does), encrypt the new pair with Fernet, SET one Redis record.
No Celery, no lock, no compare-and-swap, no bookkeeping. Run as

    python -m bench.bare SPEC.json

where the spec names the sandbox, Redis, the key and the refresh tokens to spend; it prints
one JSON object: refreshes and CPU seconds during the measured window.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
import urllib3

from worker.crypto import TokenCipher
from worker.miro import POOL_SIZE


class Loop:
    """The threads, their shared supply of refresh tokens and their counts."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.tokens: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        for pair in spec["tokens"]:
            self.tokens.put((pair[0], pair[1]))
        self.cipher = TokenCipher.from_text(spec["key"])
        # Room for as many threads as the HTTP pool below: redis-py refuses a 101st by default.
        self.redis = redis.Redis.from_url(spec["redis_url"], max_connections=POOL_SIZE)
        # Shared by the threads, and called directly, as the service's.
        self.http = urllib3.connection_from_url(spec["api_url"], maxsize=POOL_SIZE)
        self.counts = [0] * spec["threads"]
        self.stop = threading.Event()

    def run(self, index: int) -> None:
        form = {"client_id": self.spec["client_id"], "client_secret": self.spec["client_secret"]}
        while not self.stop.is_set():
            try:
                name, token = self.tokens.get_nowait()
            except queue.Empty:
                return
            fields = {**form, "grant_type": "refresh_token", "refresh_token": token}
            answer = self.http.request(
                "POST", "/v1/oauth/token", fields=fields, encode_multipart=False
            ).json()
            pair = json.dumps({"a": answer["access_token"], "r": answer["refresh_token"]})
            self.redis.set(f"bare:{name}", self.cipher.encrypt(pair.encode()))
            self.counts[index] += 1

    def measure(self) -> dict[str, float]:
        threads = [
            threading.Thread(target=self.run, args=(index,), daemon=True)
            for index in range(self.spec["threads"])
        ]
        for thread in threads:
            thread.start()
        time.sleep(self.spec["warmup_s"])
        count, cpu, wall = sum(self.counts), time.process_time(), time.perf_counter()
        time.sleep(self.spec["window_s"])
        result = {
            "count": sum(self.counts) - count,
            "cpu_seconds": time.process_time() - cpu,
            "seconds": time.perf_counter() - wall,
            "starved": self.tokens.empty(),
        }
        self.stop.set()
        for thread in threads:
            thread.join()
        return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(Loop(spec).measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
