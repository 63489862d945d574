"""What a scheduled refresh's message carries, read the same way wherever it is looked at.

Beat sends ``tasks.refresh.refresh_due`` its ids by keyword: Flower shows a message's keyword
arguments by name, so its task list reads ``{'credential_ids': [...]}``. The worker's claim
renewal and its capacity meter read them back from the messages it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The keyword of the scheduled refresh's ids (its parameter's name).
CREDENTIAL_IDS = "credential_ids"


def due_ids(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> list[str]:
    """The ids a scheduled refresh's message carries, by keyword or by position.

    By position is how earlier versions sent them. A malformed message carries none: its task
    fails on its own.
    """
    ids = (kwargs or {}).get(CREDENTIAL_IDS)
    if ids is None and isinstance(args, list | tuple) and len(args) == 1:
        ids = args[0]
    if not isinstance(ids, list):
        return []
    return [item for item in ids if isinstance(item, str)]
