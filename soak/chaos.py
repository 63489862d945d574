"""The chaos actions: each one a thing that goes wrong in production, done for real.

Every action runs to its end (the fault is switched off again) and says until when the
service may be excused for a late refresh: a killed worker's locks must expire first, a
Miro outage must pass. The soak counts an expired access token only outside those windows.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from soak.invariants import wrong_pairs
from soak.processes import ServiceProcesses
from soak.support import wait_until
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox
from worker.vault import Vault

log = logging.getLogger(__name__)

FAULT_SECONDS = 3.0
#: Longest a kill holds Miro's answers back: below the client's HTTP timeout, or every held
#: call would time out and be lost.
FREEZE_SECONDS = 2.0


@dataclass
class Stage:
    """What the actions act on, and the timing they must respect."""

    sandbox: Sandbox
    vault: Vault
    redis: RedisServer
    service: ServiceProcesses
    rng: random.Random
    access_ttl: float
    lock_ttl: float
    workers: list[str]
    counts: Counter[str] = field(default_factory=Counter)
    excused_until: float = 0.0
    next_worker: int = 0

    def excuse(self, seconds: float) -> None:
        """Late refreshes are excused until ``seconds`` from now plus one access lifetime."""
        self.excused_until = max(self.excused_until, time.time() + seconds + self.access_ttl)

    def replace_worker(self, name: str) -> None:
        self.workers.remove(name)
        self.next_worker += 1
        fresh = f"w{self.next_worker}"
        self.service.worker(fresh)
        self.workers.append(fresh)


def _fault(stage: Stage, seconds: float = FAULT_SECONDS, **faults: object) -> None:
    stage.sandbox.set_faults(**faults)
    stage.excuse(seconds)
    time.sleep(seconds)
    stage.sandbox.set_faults(**{name: type(value)() for name, value in faults.items()})


def _frozen(stage: Stage) -> bool:
    """Every call in flight is held inside Miro, and every answer already given is stored.

    At such a moment a kill interrupts rotations only inside their call to Miro, never
    between an answer and its commit: the one window no client can close (see README).
    """
    stats = stage.sandbox.stats()
    return stats["held"] == stats["token_in_flight"] and not wrong_pairs(
        stage.sandbox.grants(), stage.vault.store
    )


def kill_worker_mid_rotation(stage: Stage) -> None:
    """SIGKILL a worker while its refresh calls are inside Miro (held there)."""
    wait_until(lambda: stage.sandbox.stats()["hanging"] == 0, 60, "hung calls to end")
    stage.sandbox.set_faults(hold=True)
    try:
        wait_until(lambda: _frozen(stage), FREEZE_SECONDS, "rotations frozen in flight")
    except TimeoutError:
        stage.sandbox.set_faults(hold=False)
        stage.counts["kill skipped: no quiet moment"] += 1
        return
    victim = stage.rng.choice(stage.workers)
    stage.service.stop(stage.service.processes[victim], signal.SIGKILL)
    stage.sandbox.set_faults(hold=False)
    stage.excuse(stage.lock_ttl)
    stage.replace_worker(victim)


def terminate_worker(stage: Stage) -> None:
    """SIGTERM a worker (a deploy): its running rotations must finish and commit."""
    victim = stage.rng.choice(stage.workers)
    stage.service.stop(stage.service.processes[victim], signal.SIGTERM)
    stage.excuse(0)
    stage.replace_worker(victim)


def restart_redis(stage: Stage) -> None:
    """Kill Redis outright and bring it back from its append-only file."""
    down = stage.rng.uniform(0.5, 5.0)
    stage.excuse(down + stage.lock_ttl)  # first: the sampler reads the store
    stage.redis.kill()
    time.sleep(down)
    stage.redis.start()


def second_beat(stage: Stage) -> None:
    """A second beat for a while: no credential may be enqueued twice."""
    beat = stage.service.beat("beat-extra")
    time.sleep(FAULT_SECONDS * 2)
    stage.service.stop(beat)


def miro_errors(stage: Stage) -> None:
    _fault(stage, error_rate=0.5)


def miro_rate_limits(stage: Stage) -> None:
    _fault(stage, rate_limit_rate=0.5, rate_limit_reset_s=1.0)


def miro_slower_than_the_lock(stage: Stage) -> None:
    """Some calls take longer than the lock lives: the client has long given up."""
    _fault(stage, hang_rate=0.05, hang_s=stage.lock_ttl + 1)


def miro_hangs(stage: Stage) -> None:
    _fault(stage, hang_rate=0.05, hang_s=stage.lock_ttl / 2)


def miro_loses_answers(stage: Stage) -> None:
    """Miro rotates, then the answer is lost: those users must reconnect (and only those)."""
    _fault(stage, lose_rate=0.05)


def user_revokes(stage: Stage) -> None:
    """A user uninstalls the app in Miro."""
    alive = [g for g in stage.sandbox.grants() if not (g["revoked"] or g["lost"])]
    grant = stage.rng.choice(alive)
    stage.sandbox.revoke_grant(grant["team_id"], grant["user_id"])


ACTIONS: dict[str, Callable[[Stage], None]] = {
    "kill -9 worker mid-rotation": kill_worker_mid_rotation,
    "SIGTERM worker": terminate_worker,
    "Redis killed and restarted": restart_redis,
    "second beat": second_beat,
    "Miro 500s": miro_errors,
    "Miro 429s": miro_rate_limits,
    "Miro slower than the lock TTL": miro_slower_than_the_lock,
    "Miro hangs": miro_hangs,
    "Miro loses answers": miro_loses_answers,
    "user revokes the app": user_revokes,
}


def run_chaos(stage: Stage, seconds: float, names: Sequence[str] = tuple(ACTIONS)) -> None:
    """Random actions of ``names``, one at a time, until ``seconds`` passed and each ran once."""
    deadline = time.monotonic() + seconds
    order = list(names)
    stage.rng.shuffle(order)
    while order or time.monotonic() < deadline:
        name = order.pop() if order else stage.rng.choice(list(names))
        log.info("chaos: %s", name)
        ACTIONS[name](stage)
        stage.counts[name] += 1
        time.sleep(stage.rng.uniform(0.5, 2.0))
