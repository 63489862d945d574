"""The soak's verdict: what must hold after any amount of chaos."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.constants import FAILING
from worker.credential import CredentialId, State
from worker.journal import Journal
from worker.schedule import backoff
from worker.secret import Secret
from worker.store import CredentialStore

#: Seconds a retry may take once its backoff has run out: a scan interval to claim it, and
#: one call to Miro.
RETRY_PICKUP = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _key(grant: dict[str, Any]) -> str:
    return f"{grant['team_id']}:{grant['user_id']}"


def _gone(grant: dict[str, Any]) -> bool:
    """Lost on purpose (an answer Miro never delivered) or revoked by its user."""
    return bool(grant["lost"] or grant["revoked"])


def wrong_pairs(grants: list[dict[str, Any]], store: CredentialStore) -> list[str]:
    """Alive credentials whose stored refresh token is not the one Miro considers current."""
    return [
        _key(g)
        for g in grants
        if not _gone(g)
        and store.load(CredentialId(g["team_id"], g["user_id"])).refresh_token
        != Secret(g["refresh_token"])
    ]


def backing_off(store: CredentialStore, credential_id: str, now: float) -> bool:
    """Whether a credential is still within the backoff its last failures at Miro earned.

    The backoff does not shrink with the soak's short token lifetimes as the tokens do: two
    failures in one fault and a third in the next back a credential off for up to 20 s,
    as long as its 20 s token lives (against 60 minutes in production). Such a token may
    expire; it must not stay expired past its retry. The time of the last failure is the
    credential's score in the failing set; its count of failures is read from the record's
    header, which needs no key.
    """
    failed_at = store.redis.zscore(FAILING, credential_id)
    if failed_at is None:
        return False
    view = next(store.describe([CredentialId.parse(credential_id)]), {})
    failures = int(view.get("failure_count") or 0)
    return failures > 0 and now <= failed_at + backoff(failures) + RETRY_PICKUP


def holds_current_pairs(grants: list[dict[str, Any]], store: CredentialStore) -> Check:
    alive = [g for g in grants if not _gone(g)]
    wrong = wrong_pairs(alive, store)
    return Check(
        "every alive credential holds Miro's current pair",
        not wrong,
        f"{len(alive) - len(wrong)} of {len(alive)}" + (f"; wrong: {wrong[:5]}" if wrong else ""),
    )


def no_reused_refresh_token(stats: dict[str, int]) -> Check:
    reused = stats["reused_refresh_tokens"]
    return Check(
        "no refresh token used twice",
        reused == 0,
        f"{reused} (and {stats['reused_after_loss']} retried after a lost answer, as they must)",
    )


def nothing_expired_unexcused(expired: list[str], samples: int) -> Check:
    return Check(
        "no access token expired while active and Miro reachable",
        not expired,
        f"{len(expired)} in {samples} samples" + (f": {expired[:5]}" if expired else ""),
    )


def needs_reauth_only_where_lost(grants: list[dict[str, Any]], store: CredentialStore) -> Check:
    gone = {_key(g) for g in grants if _gone(g)}
    marked = [str(cid) for cid in store.ids() if store.load(cid).state is State.NEEDS_REAUTH]
    wrongly = sorted(set(marked) - gone)
    return Check(
        "needs_reauth only where Miro lost the answer or the user revoked",
        not wrongly,
        f"{len(marked)} needs_reauth, {len(gone)} lost or revoked"
        + (f"; wrongly: {wrongly[:5]}" if wrongly else ""),
    )


def still_active(grants: list[dict[str, Any]], store: CredentialStore) -> list[str]:
    """Credentials whose users removed the app, yet still active (deleted ones are fine)."""
    left = [CredentialId(g["team_id"], g["user_id"]) for g in grants if g["revoked"]]
    return [view["id"] for view in store.describe(left) if view["state"] == State.ACTIVE]


def users_who_left_need_reauth(grants: list[dict[str, Any]], store: CredentialStore) -> Check:
    left = sum(1 for g in grants if g["revoked"])
    active = still_active(grants, store)
    return Check(
        "every user who removed the app ends needs_reauth",
        not active,
        f"{left - len(active)} of {left}" + (f"; still active: {active[:5]}" if active else ""),
    )


def journal_empty(data_dir: Path) -> Check:
    pending = Journal(data_dir).pending_count()
    return Check("the rescue journal is empty after recovery", pending == 0, f"{pending} entries")


def none_missing(grants: list[dict[str, Any]], store: CredentialStore) -> Check:
    stored = {str(cid) for cid in store.ids()}
    missing = sorted({_key(g) for g in grants} - stored)
    return Check("no credential vanished from the store", not missing, f"{len(missing)} missing")


def none_exited(processes: dict[str, subprocess.Popen[bytes]], expected: list[str]) -> Check:
    """The service's processes the chaos did not stop are all still running.

    A worker that stops by itself (an error Celery takes as unrecoverable) leaves every
    credential to expire; named here, it is not left to be inferred from expired tokens.
    """
    codes = {name: processes[name].poll() for name in expected}
    exited = {name: code for name, code in codes.items() if code is not None}
    return Check(
        "no worker or beat exited on its own",
        not exited,
        f"{len(expected) - len(exited)} of {len(expected)} running"
        + (f"; exited, with their codes: {exited}" if exited else ""),
    )
