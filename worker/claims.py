"""Claims a worker holds: renewed while their credentials wait in its tasks.

The scan hides each credential it hands out for ``CLAIM_LEASE`` seconds (``scan.py``). A
worker holding it, in a task it has reserved or in the part of a running task not rotated
yet, renews that claim every fraction of the lease, so the lease can be short: when the
worker dies, its credentials come due again within seconds. A credential leaves the renewal
when its rotation begins; from then on its lock hides it from the scan, and its rotation
ends by writing its due time (``take_lock.lua``).

A renewal must never land after that write, or it would overwrite the due time a finished
rotation chose: the renewal and the beginning of a rotation take turns on one lock. The cost
of a renewal grows with the work the worker holds, never with the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from redis import Redis

from worker.constants import DUE_INDEX

#: Renewals per lease: a claim renewed a quarter of a lease late still has half of it left.
RENEWALS_PER_LEASE = 4


class ClaimRenewal:
    """The claims of one worker process's tasks, renewed until each rotation begins."""

    def __init__(self, lease: float, clock: Callable[[], float] = time.time) -> None:
        self.lease = lease
        self.clock = clock
        self._turn = threading.Lock()
        #: Task id -> the credentials of that task whose rotation has begun.
        self._begun: dict[str, set[str]] = {}

    @property
    def interval(self) -> float:
        return self.lease / RENEWALS_PER_LEASE

    def begin(self, task_id: str, credential_id: str) -> None:
        """The rotation of ``credential_id`` in task ``task_id`` begins: renew it no more.

        Waits for a renewal under way to end, so that none lands after the rotation's write.
        """
        with self._turn:
            self._begun.setdefault(task_id, set()).add(credential_id)

    def renew(self, redis: Redis, held: Mapping[str, Sequence[str]]) -> int:
        """Push the claims of ``held`` (task id -> its credential ids) to a lease from now.

        Only the credentials whose rotation has not begun; a due time further away than the
        lease (written meanwhile by a rotation elsewhere) is left as it is, and a credential no
        longer scheduled is not put back. Tasks no longer held are forgotten.

        Returns:
            How many claims were renewed.
        """
        with self._turn:
            self._begun = {task: ids for task, ids in self._begun.items() if task in held}
            waiting = {
                credential_id
                for task, ids in held.items()
                for credential_id in ids
                if credential_id not in self._begun.get(task, ())
            }
            if waiting:
                until = self.clock() + self.lease
                redis.zadd(DUE_INDEX, dict.fromkeys(waiting, until), xx=True, gt=True)
            return len(waiting)
