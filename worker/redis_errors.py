"""How a Redis error is named in logs and results: by its kind, never by what it quotes.

Redis echoes a command's arguments in some replies (``unknown command ..., with args
beginning with``), and a rotation's arguments are token ciphertexts; the error's class and
Redis's own error code (``READONLY``, ``OOM``, ``MISCONF``) say what went wrong without them.
"""

from __future__ import annotations

import re

from redis.exceptions import RedisError

#: Redis before 7 puts this before the error of a command a script called.
_SCRIPT_PREFIX = re.compile(r"Error running script \(call to \w+\): @user_script:\d+: ")


def describe(error: RedisError) -> str:
    """``ReadOnlyError``, ``ResponseError MISCONF``, ``ConnectionError``: nothing quoted."""
    kind = type(error).__name__
    words = _SCRIPT_PREFIX.sub("", str(error), count=1).split(maxsplit=1)
    code = words[0] if words and words[0].isupper() and words[0].isalpha() else ""
    return f"{kind} {code}" if code else kind
