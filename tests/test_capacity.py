"""The need read from the due index, the workers' reports in Redis, and the verdict."""

from __future__ import annotations

import time

import pytest
import redis

from settings import Settings
from worker import capacity
from worker.capacity import (
    REPORT_TTL,
    TOKEN_RATE,
    WORKERS_SHORT,
    WorkerReport,
    read_capacity,
    refresh_cycle,
    summarize,
)
from worker.constants import worker_key
from worker.sandbox import Sandbox
from worker.vault import Vault


def report(name: str = "w1@host", **changes: object) -> WorkerReport:
    fields: dict[str, object] = {
        "name": name,
        "threads": 64,
        "refresh_seconds": 0.2,
        "capacity": 320.0,
        "throughput": 12.0,
        "token_rate": 50.0,
        **changes,
    }
    return WorkerReport(**fields)  # type: ignore[arg-type]


def _store(sandbox: Sandbox, vault: Vault, count: int, expires_in: int = 3599) -> None:
    vault.import_many({**grant, "expires_in": expires_in} for grant in sandbox.create_grants(count))


def test_eager_need_is_the_scheduled_credentials_over_the_refresh_cycle(
    sandbox: Sandbox, vault: Vault, settings: Settings
) -> None:
    _store(sandbox, vault, 300)

    figures, _ = read_capacity(vault.redis, settings)

    assert refresh_cycle(settings) == pytest.approx(3599 - 900 * 1.05)
    assert figures.steady == pytest.approx(300 / refresh_cycle(settings))
    assert figures.due_soon == 0  # due in about 45 minutes, beyond the 15-minute margin
    assert figures.needed == figures.steady


def test_credentials_due_within_a_margin_raise_the_need_above_the_steady_reading(
    sandbox: Sandbox, vault: Vault, settings: Settings
) -> None:
    _store(sandbox, vault, 100)
    _store(sandbox, vault, 450, expires_in=1200)  # due within the next 15 minutes

    figures, _ = read_capacity(vault.redis, settings)

    assert figures.due_soon == pytest.approx(450 / 900)
    assert figures.steady == pytest.approx(550 / refresh_cycle(settings))
    assert figures.needed == figures.due_soon > figures.steady


def test_keepalive_needs_one_renewal_per_refresh_token_lifetime(
    env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    settings = Settings.from_env({**env, "REFRESH_POLICY": "keepalive"})
    _store(sandbox, Vault.from_settings(settings), 1000)

    figures, _ = read_capacity(redis_client, settings)

    cycle = 60 * 86400 - 7 * 86400 * 1.05
    assert refresh_cycle(settings) == pytest.approx(cycle)
    assert figures.steady == pytest.approx(1000 / cycle)


def test_inactive_credentials_need_nothing(sandbox: Sandbox, vault: Vault) -> None:
    _store(sandbox, vault, 2)
    [one, _] = sorted(vault.store.ids())
    sandbox.revoke_grant(one.team_id, one.user_id)
    assert vault.rotate_now(one).outcome == "needs_reauth"

    figures, _ = read_capacity(vault.redis, vault.settings)

    assert figures.steady == pytest.approx(1 / refresh_cycle(vault.settings))


def test_reports_are_summed_and_expire_with_redis_clock(
    redis_client: redis.Redis, settings: Settings
) -> None:
    capacity.publish(redis_client, report("w1@a", capacity=300.0, throughput=10.0))
    capacity.publish(redis_client, report("w2@b", refresh_seconds=None, capacity=6.4))

    figures, gone = read_capacity(redis_client, settings)

    assert gone == []
    assert figures.workers == 2 and figures.unmeasured_workers == 1
    assert figures.worker_capacity == pytest.approx(306.4)
    assert figures.worker_throughput == pytest.approx(22.0)
    assert 0 < redis_client.ttl(worker_key("w1@a")) <= REPORT_TTL


def test_a_gone_worker_is_not_counted_and_can_be_forgotten(
    redis_client: redis.Redis, settings: Settings
) -> None:
    capacity.publish(redis_client, report("w1@a"))
    capacity.publish(redis_client, report("w2@b"))
    redis_client.delete(worker_key("w2@b"))  # what its report's expiry does
    capacity.publish(redis_client, report("w3@c"))
    capacity.withdraw(redis_client, "w3@c")  # a worker stopping

    figures, gone = read_capacity(redis_client, settings)
    capacity.forget(redis_client, gone)

    assert figures.workers == 1 and gone == ["w2@b"]
    assert redis_client.smembers("mtk:workers") == {b"w1@a"}


def test_the_token_rate_is_the_one_the_workers_enforce(settings: Settings) -> None:
    reports = [report("a", token_rate=200.0), report("b", token_rate=150.0)]

    assert summarize(settings, 1.0, 0.0, reports).token_rate == 150.0
    assert summarize(settings, 1.0, 0.0, []).token_rate == settings.miro_token_rate


def test_a_need_above_the_rate_limit_names_the_rate_to_set(settings: Settings) -> None:
    figures = summarize(settings, 377.0, 20.0, [report(token_rate=50.0, capacity=1000.0)])

    assert figures.short_of == [TOKEN_RATE]
    [sentence] = figures.shortfalls().values()
    assert "need 377/s" in sentence and "MIRO_TOKEN_RATE allows 50/s" in sentence
    assert "raise it to at least 377" in sentence


def test_workers_short_of_the_need_are_told_how_many_more_to_start(settings: Settings) -> None:
    reports = [report(name, capacity=100.0, token_rate=1000.0) for name in ("a", "b")]
    figures = summarize(settings, 450.0, 0.0, reports)

    assert figures.short_of == [WORKERS_SHORT]
    sentence = figures.shortfalls()[WORKERS_SHORT]
    assert "the 2 workers seen can do 200/s" in sentence
    assert "start 3 more like them (about 100/s each)" in sentence


def test_no_worker_seen_is_a_shortfall_only_while_something_needs_refreshing(
    settings: Settings,
) -> None:
    assert summarize(settings, 0.0, 0.0, []).short_of == []
    figures = summarize(settings, 0.01, 0.0, [])
    assert figures.short_of == [WORKERS_SHORT]
    assert "no worker has been seen" in figures.shortfalls()[WORKERS_SHORT]


def test_the_figures_are_read_at_the_given_time(
    sandbox: Sandbox, vault: Vault, settings: Settings
) -> None:
    _store(sandbox, vault, 90)

    later, _ = read_capacity(vault.redis, settings, now=time.time() + 3000)

    assert later.due_soon == pytest.approx(90 / 900)
