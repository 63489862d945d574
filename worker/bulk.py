"""Work shared out over forked processes, all or nothing: a big import uses every core.

An import is CPU-bound in Python (checking each response, Fernet, building the records):
one process keeps one core busy while Redis takes each batch in a fraction of the time.
Forked children inherit the work (functions and their inputs) instead of receiving it
through a pipe, and send back only small results.
"""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Checked = TypeVar("Checked")
Result = TypeVar("Result")

#: How long a child waits at the barrier for the others to finish checking. A child that
#: dies breaks the pool and fails the run at once; one that hangs in its check holds the run
#: (the parent waits for every child), and the others give up waiting after this long.
CHECK_TIMEOUT = 600.0

#: What the children of the running :func:`fork_map` inherit.
_inherited: list[tuple[Any, ...]] = []


def fork_map(
    check: Callable[[Item], Checked],
    apply: Callable[[Checked], Result],
    items: Sequence[Item],
) -> list[Result]:
    """``apply(check(item))`` for each item, each in a forked process, all or nothing.

    Every child checks its item first; only when every check has passed does any child go on
    to ``apply``. The functions may be closures or bound methods: they are inherited, not
    pickled. Results are pickled back.

    Only the checks are all or nothing: an error while applying stops that child alone, and
    what the others applied stays applied (for an import: stored).

    Raises:
        Exception: the first error of a check, in the order of ``items`` (nothing was
            applied), or of an ``apply``. An exception that cannot be rebuilt here shows as
            ``BrokenProcessPool``.
    """
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(items), timeout=CHECK_TIMEOUT)
    failed = context.Event()
    _inherited.append((check, apply, items, barrier, failed))
    # Out of the collector's sight while the children live: a child's collection would walk
    # every inherited object (a million-user input; the benchmark's sandbox too), write to
    # each one's header and so copy every page of the heap it shares with this process.
    gc.freeze()
    try:
        with ProcessPoolExecutor(len(items), mp_context=context) as pool:
            # A child returns None only when another failed its check: list() raises first.
            return list(pool.map(_run_inherited, range(len(items))))
    finally:
        gc.unfreeze()
        _inherited.clear()


def _run_inherited(index: int) -> Any:
    check, apply, items, barrier, failed = _inherited[-1]
    try:
        checked = check(items[index])
    except BaseException:
        failed.set()
        barrier.wait()
        raise
    barrier.wait()
    return None if failed.is_set() else apply(checked)
