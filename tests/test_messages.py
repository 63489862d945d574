"""The ids of a scheduled refresh's message, as the worker's claim renewal and meter read them."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.messages import due_ids

IDS = ["1:2", "3:4"]


@pytest.mark.parametrize(
    ("args", "kwargs", "ids"),
    [
        ((), {"credential_ids": IDS}, IDS),  # as beat sends them
        ([], {"credential_ids": IDS}, IDS),
        ((IDS,), {}, IDS),  # as an earlier version's scan sent them
        ([IDS], None, IDS),
        ((), {"credential_ids": [*IDS, 5, None]}, IDS),  # the ids of it that are strings
        ((), {"credential_ids": "1:2"}, []),
        ((IDS, IDS), {}, []),
        (None, None, []),
        ((), {"other": IDS}, []),
    ],
)
def test_a_messages_ids_are_read_by_keyword_or_by_position(
    args: Any, kwargs: Any, ids: list[str]
) -> None:
    assert due_ids(args, kwargs) == ids
