"""One soak: the real service, chaos for a while, a calm settling period, then the verdict.

Everything is real and local: a ``redis-server`` with append-only persistence (killed and
restarted), the Miro sandbox with short token lifetimes (speaking the dialect asked for:
``uniform`` words every refusal alike), two ``celery worker`` processes and a ``celery
beat``. While the chaos runs, a sampler watches the sandbox for access tokens that expire
outside the windows the chaos excuses.
"""

from __future__ import annotations

import logging
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from settings import Settings
from soak import invariants
from soak.chaos import ACTIONS, Stage, run_chaos
from soak.processes import ServiceProcesses
from soak.support import free_port, wait_until
from worker.constants import OUTCOME_COUNTERS
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox, SandboxConfig
from worker.sandbox.server import Dialect
from worker.vault import Vault

log = logging.getLogger(__name__)

CLIENT_ID = "3458764500000000042"
SAMPLE_INTERVAL = 0.5
LOCK_TTL = 8


@dataclass(frozen=True)
class SoakConfig:
    credentials: int = 300
    chaos_seconds: float = 45.0
    settle_seconds: float = 60.0
    access_ttl: int = 20
    workers: int = 2
    seed: int | None = None
    #: How the sandbox words its refusals (see worker.sandbox.server.DIALECTS).
    dialect: Dialect = "miro"
    #: The chaos actions to draw from (names of chaos.ACTIONS); all of them by default.
    actions: tuple[str, ...] = tuple(ACTIONS)


@dataclass
class Verdict:
    checks: list[invariants.Check]
    rotations: int
    chaos: Counter[str]
    seconds: float
    logs: Path
    #: Rotations by outcome, as the workers counted them: a credential handed out twice
    #: shows as ``skipped_fresh`` or ``busy``.
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def table(self) -> str:
        width = max(len(check.name) for check in self.checks)
        lines = [f"{'invariant':<{width}}  result  detail", "-" * (width + 40)]
        lines += [
            f"{c.name:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}" for c in self.checks
        ]
        chaos = ", ".join(f"{name} x{count}" for name, count in sorted(self.chaos.items()))
        outcomes = ", ".join(f"{name} {count:,}" for name, count in sorted(self.outcomes.items()))
        lines += [
            "",
            f"{self.rotations:,} rotations in {self.seconds:.0f} s; chaos: {chaos}",
            f"outcomes: {outcomes}",
            f"logs: {self.logs}",
            "VERDICT: " + ("PASS" if self.ok else "FAIL"),
        ]
        return "\n".join(lines)


def _environment(
    config: SoakConfig, redis: RedisServer, sandbox: Sandbox, secret: str, data_dir: Path
) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "MIRO_CLIENT_ID": CLIENT_ID,
        "MIRO_CLIENT_SECRET": secret,
        "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/oauth/callback",
        "MIRO_API_URL": sandbox.url,
        "MIRO_AUTH_URL": sandbox.url,
        "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "DATA_DIR": str(data_dir),
        "ACCESS_REFRESH_MARGIN": str(config.access_ttl * 3 // 4),
        "SCAN_INTERVAL": "1",
        "CLAIM_LEASE": "5",
        "HTTP_TIMEOUT": "3",
        "COMMIT_RETRY_SECONDS": "3",
        "LOCK_TTL": str(LOCK_TTL),
        "PROBE_INTERVAL": "2",
        "REFUSAL_CONFIRM_DELAY": "3",
        "WORKER_CONCURRENCY": "16",
        "MIRO_TOKEN_RATE": "1000",
    }


class Sampler(threading.Thread):
    """Looks every half second for access tokens expired outside an excused window.

    A credential backing off after Miro's errors is excused until its retry is due (see
    :func:`invariants.backing_off`).
    """

    def __init__(self, stage: Stage) -> None:
        super().__init__(daemon=True)
        self.stage = stage
        self.expired: list[str] = []
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_INTERVAL):
            try:
                self._sample()
            except Exception as error:  # a sampler that died would pass its check vacuously
                self.expired.append(f"(the sampler failed: {error!r})")

    def _sample(self) -> None:
        now = time.time()
        self.samples += 1
        if now < self.stage.excused_until:
            return
        expired = [
            f"{g['team_id']}:{g['user_id']}"
            for g in self.stage.sandbox.grants()
            if not (g["lost"] or g["revoked"]) and g["access_expires_at"] <= now
        ]
        store = self.stage.vault.store
        self.expired += [cid for cid in expired if not invariants.backing_off(store, cid, now)]


def run(config: SoakConfig, work_dir: Path | None = None) -> Verdict:
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.monotonic()
    secret = secrets.token_urlsafe(24)
    redis = RedisServer(work_dir / "redis", free_port()).start()
    sandbox_config = SandboxConfig(
        CLIENT_ID, secret, access_ttl=config.access_ttl, dialect=config.dialect
    )
    sandbox = Sandbox(sandbox_config).start()
    env = _environment(config, redis, sandbox, secret, work_dir / "data")
    settings = Settings.from_env(env)
    service = ServiceProcesses(env, work_dir / "logs")
    try:
        vault = Vault.from_settings(settings)
        stage = _start(config, sandbox, vault, redis, service)
        for response in sandbox.create_grants(config.credentials):
            vault.import_response(response)
        sampler = Sampler(stage)
        sampler.start()
        run_chaos(stage, config.chaos_seconds, config.actions)
        _settle(stage, config)
        sampler.done.set()
        running = invariants.none_exited(service.processes, [*stage.workers, "beat"])
        service.stop_all()  # graceful: every running rotation commits first
        checks = [running, *_checks(sandbox, vault, sampler, settings.data_dir)]
        return Verdict(
            checks,
            sandbox.stats()["refreshes"],
            stage.counts,
            time.monotonic() - started,
            work_dir / "logs",
            _outcomes(vault),
        )
    finally:
        service.stop_all()
        sandbox.stop()
        redis.stop()


def _start(
    config: SoakConfig,
    sandbox: Sandbox,
    vault: Vault,
    redis: RedisServer,
    service: ServiceProcesses,
) -> Stage:
    workers = [f"w{n}" for n in range(config.workers)]
    for name in workers:
        service.worker(name)
    service.beat()
    for name in workers:
        service.wait_ready(name)
    return Stage(
        sandbox=sandbox,
        vault=vault,
        redis=redis,
        service=service,
        rng=random.Random(config.seed),
        access_ttl=config.access_ttl,
        lock_ttl=LOCK_TTL,
        workers=workers,
        next_worker=len(workers),
    )


def _settle(stage: Stage, config: SoakConfig) -> None:
    """Calm: every alive credential rotates once more, so each fault has been recovered from.

    And the users who removed the app are found out: their credentials marked.
    """
    stage.sandbox.set_faults(
        hold=False, error_rate=0.0, rate_limit_rate=0.0, hang_rate=0.0, lose_rate=0.0
    )
    before = {(g["team_id"], g["user_id"]): g["rotations"] for g in stage.sandbox.grants()}

    def settled() -> bool:
        grants = stage.sandbox.grants()
        return not invariants.still_active(grants, stage.vault.store) and all(
            g["rotations"] > before[(g["team_id"], g["user_id"])]
            for g in grants
            if not (g["lost"] or g["revoked"])
        )

    try:
        wait_until(
            settled,
            config.settle_seconds,
            "every alive credential to rotate again, and those who left to be marked",
        )
    except TimeoutError as error:
        log.error("soak: %s", error)


def _outcomes(vault: Vault) -> dict[str, int]:
    counted = vault.redis.hgetall(OUTCOME_COUNTERS)
    return {name.decode(): int(count) for name, count in counted.items()}


def _checks(
    sandbox: Sandbox, vault: Vault, sampler: Sampler, data_dir: Path
) -> list[invariants.Check]:
    grants = sandbox.grants()
    return [
        invariants.holds_current_pairs(grants, vault.store),
        invariants.no_reused_refresh_token(sandbox.stats()),
        invariants.nothing_expired_unexcused(sampler.expired, sampler.samples),
        invariants.needs_reauth_only_where_lost(grants, vault.store),
        invariants.users_who_left_need_reauth(grants, vault.store),
        invariants.journal_empty(data_dir),
        invariants.none_missing(grants, vault.store),
    ]
