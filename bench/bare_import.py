"""The bare minimum an import needs, for the import benchmark to compare the command with.

One process reads the whole file, encrypts each response's two tokens with Fernet and
stores them with a pipelined ``SET`` (the record) and ``ZADD`` (a due index), a thousand
responses per round trip. No checks, no header, no compare-and-swap, no id index, no counts:
the naive migration script the service's ``import`` command must beat. Run as

    python -m bench.bare_import FILE

with ``REDIS_URL`` and ``TOKEN_ENCRYPTION_KEYS`` in the environment; it prints how many it
stored.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import redis

from worker.crypto import TokenCipher

BATCH = 1000
KEY_PREFIX = "bare-import:"
DUE_INDEX = "bare-import-due"


def main(argv: list[str]) -> int:
    responses = json.loads(Path(argv[0]).read_bytes())
    cipher = TokenCipher.from_text(os.environ["TOKEN_ENCRYPTION_KEYS"])
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    now = time.time()
    for start in range(0, len(responses), BATCH):
        with client.pipeline(transaction=False) as pipe:
            for response in responses[start : start + BATCH]:
                name = f"{response['team_id']}:{response['user_id']}"
                tokens = f"{response['access_token']}\n{response['refresh_token']}"
                pipe.set(KEY_PREFIX + name, cipher.encrypt(tokens.encode()))
                pipe.zadd(DUE_INDEX, {name: now + response["expires_in"]})
            pipe.execute()
    print(json.dumps({"imported": len(responses)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
