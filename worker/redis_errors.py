"""How a Redis error is named in logs and results: by its kind, never by what it quotes.

Redis echoes a command's arguments in some replies (``unknown command ..., with args
beginning with``), and a rotation's arguments are token ciphertexts; the error's class and
Redis's own error code (``READONLY``, ``OOM``, ``MISCONF``) say what went wrong without them.
"""

from __future__ import annotations

from redis.exceptions import RedisError


def describe(error: RedisError) -> str:
    """``ReadOnlyError``, ``ResponseError MISCONF``, ``ConnectionError``: nothing quoted."""
    kind = type(error).__name__
    words = str(error).split(maxsplit=1)
    code = words[0] if words and words[0].isupper() and words[0].isalpha() else ""
    return f"{kind} {code}" if code else kind
