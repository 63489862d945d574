"""Forked work, all or nothing: no process applies anything unless every check passed."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from worker.bulk import fork_map


def test_results_come_back_in_order_from_inherited_closures() -> None:
    offset = 100  # a closure: inherited by the children, never pickled

    results = fork_map(lambda item: item + offset, lambda checked: checked * 2, [1, 2, 3])

    assert results == [202, 204, 206]


def test_a_failed_check_anywhere_applies_nothing_anywhere(tmp_path: Path) -> None:
    def check(item: int) -> int:
        if item == 3:
            raise ValueError("item 3 is bad")
        return item

    def apply(item: int) -> int:
        (tmp_path / str(item)).touch()
        return item

    with pytest.raises(ValueError, match="item 3 is bad"):
        fork_map(check, apply, [1, 2, 3])

    assert list(tmp_path.iterdir()) == []


def test_an_error_while_applying_is_raised_here() -> None:
    def apply(item: int) -> int:
        raise RuntimeError(f"cannot apply {item}")

    with pytest.raises(RuntimeError, match="cannot apply 2"):
        fork_map(lambda item: item, apply, [2])


def test_children_inherit_a_frozen_heap_and_the_parent_gets_it_back() -> None:
    # Frozen, a child's collections leave the inherited pages alone (no copy on write).
    frozen_in_children = fork_map(lambda item: gc.get_freeze_count(), lambda count: count, [1, 2])
    assert all(count > 0 for count in frozen_in_children)
    assert gc.get_freeze_count() == 0
