"""Work over forked processes: inherited, not pickled; results and errors come back in order."""

from __future__ import annotations

import gc
import os

import pytest

from worker.bulk import fork_map


def test_results_come_back_in_order_from_inherited_closures() -> None:
    offset = 100  # a closure: inherited by the children, never pickled

    results = fork_map(lambda item: item + offset, [1, 2, 3])

    assert results == [101, 102, 103]


def test_the_items_are_worked_on_in_forked_processes() -> None:
    parent = os.getpid()

    parents = fork_map(lambda _: (os.getpid(), os.getppid()), [1, 2, 3])

    assert all(pid != parent and ppid == parent for pid, ppid in parents)


def test_the_first_error_in_the_order_of_the_items_is_raised_here() -> None:
    def work(item: int) -> int:
        if item > 1:
            raise RuntimeError(f"cannot work on {item}")
        return item

    with pytest.raises(RuntimeError, match="cannot work on 2"):
        fork_map(work, [1, 2, 3])


def test_children_inherit_a_frozen_heap_and_the_parent_gets_it_back() -> None:
    # Frozen, a child's collections leave the inherited pages alone (no copy on write).
    frozen_in_children = fork_map(lambda _: gc.get_freeze_count(), [1, 2])
    assert all(count > 0 for count in frozen_in_children)
    assert gc.get_freeze_count() == 0
