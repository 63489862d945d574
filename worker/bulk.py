"""Work shared out over forked processes: a big import uses every core.

An import is CPU-bound in Python (checking each response, Fernet, building the records):
one process keeps one core busy while Redis takes each batch in a fraction of the time.
Forked children inherit the work (the function and what it reads) instead of receiving it
through a pipe, and send back only small results.
"""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: What the children of the running :func:`fork_map` inherit.
_inherited: list[tuple[Callable[[Any], Any], Sequence[Any]]] = []


def fork_map(work: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``work(item)`` for each item, in as many forked processes at once; results in order.

    ``work`` may be a closure or a bound method: it is inherited, not pickled. Results are
    pickled back.

    Raises:
        Exception: the first error, in the order of ``items``, once every child has ended.
            An exception that cannot be rebuilt here shows as ``BrokenProcessPool``.
    """
    context = multiprocessing.get_context("fork")
    _inherited.append((work, items))
    # Out of the collector's sight while the children live: a child's collection would walk
    # every inherited object (a list of responses to import; the benchmark's sandbox), write
    # to each one's header and so copy every page of the heap it shares with this process.
    gc.freeze()
    try:
        with ProcessPoolExecutor(len(items), mp_context=context) as pool:
            return list(pool.map(_run_inherited, range(len(items))))
    finally:
        gc.unfreeze()
        _inherited.clear()


def _run_inherited(index: int) -> Any:
    work, items = _inherited[-1]
    return work(items[index])
