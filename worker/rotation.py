"""The rotation of one credential: the rules that keep a single-use refresh token alive.

1. Take the credential's single-flight lock, read the record under it and reserve a slot
   at Miro's token endpoint, in one step: another process may have rotated it while we
   waited.
2. Ask Miro for a new pair.
3. Commit the pair with a compare-and-swap on the version that was read, letting go of the
   lock in the same step; retry while Redis is unreachable or refuses writes and, past
   ``COMMIT_RETRY_SECONDS``, spill it to the journal, keeping the lock until it is replayed.
4. On a refusal, re-read first: if the version moved, another process won a race and the
   credential is fine. Otherwise ask Miro whether it still honours the access token
   (:mod:`worker.evidence`), and count the refusal across workers (:mod:`worker.incident`):

   - during an incident nothing is marked; the credential backs off;
   - a grant Miro still honours puts the app's credentials in doubt, not the user's: the
     credential backs off as after any failure;
   - a scheduled rotation's first refusal is tried again ``confirm_delay`` later;
   - then the credential is marked ``needs_reauth`` if Miro refuses its access token too, or
     if the app was seen working (a success anywhere) since its first refusal. Without
     either, a wrong client secret would read exactly the same: it backs off, unmarked, and
     nothing is lost by waiting, since a refusal spends no token.

   Forced rotations judge alike, without the confirmation delay.

Nothing here knows about Celery: tasks and the CLI call :meth:`Rotator.rotate`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from redis.exceptions import RedisError

from worker import miro, redis_errors
from worker.backoff import Backoff
from worker.constants import OUTCOME_COUNTERS
from worker.credential import Credential, CredentialId, State
from worker.crypto import TokenCipher, UndecryptableError
from worker.evidence import Evidence, weigh
from worker.incident import IncidentGuard
from worker.journal import Journal, JournalEntry, ReplayReport
from worker.lock import Flight, LockRequest, let_go_ahead, single_flight
from worker.outcomes import Listener, Outcome, RotationResult, StateChange
from worker.ratelimit import TokenRateLimit
from worker.record import CorruptRecordError, RawRecord, decode, encode
from worker.schedule import Policy, retry_at
from worker.store import CredentialStore

log = logging.getLogger(__name__)

#: A corrupt record is looked at again this much later (it stays visible as overdue).
CORRUPT_RETRY = 3600.0
#: A first refusal is tried again this much later before the credential is given up.
CONFIRM_DELAY = 30.0
#: Why a credential Miro refused is not marked, though no incident is on.
GRANT_ALIVE = (
    "Miro refused the refresh but still honours the access token: the grant is alive, so the "
    "app's credentials (MIRO_CLIENT_ID/SECRET) or Miro are at fault"
)
UNCONFIRMED = (
    "Miro refused the refresh, but no refresh has succeeded since its first refusal, so the "
    "app's credentials (MIRO_CLIENT_ID/SECRET) may be at fault; tried again later"
)
#: Seconds a thread may go on the previous reading of the pause flag before calling Miro:
#: one Redis round trip less per refresh, at the cost of a call or two after a pause.
PAUSE_READING_AGE = 1.0


#: Told that a scheduled rotation begins (see :meth:`Rotator.rotate_due`).
Beginning = Callable[[CredentialId], None]


@dataclass
class Rotator:
    """Rotates credentials; one per process, shared by its threads."""

    store: CredentialStore
    client: miro.MiroClient
    policy: Policy
    journal: Journal
    lock_ttl: float
    commit_retry_seconds: float
    refresh_token_lifetime: int
    listeners: list[Listener]
    guard: IncidentGuard
    #: The shared limit on calls to Miro's token endpoint; a slot is reserved with the lock.
    rate_limit: TokenRateLimit
    #: How long after a scheduled rotation's first refusal it is tried again.
    confirm_delay: float = CONFIRM_DELAY
    clock: Callable[[], float] = time.time
    #: Told as each scheduled rotation begins, before it can write the credential's due time:
    #: from then on its lock, not its claim, keeps the scan off the credential.
    beginning: list[Beginning] = field(default_factory=list)

    @property
    def cipher(self) -> TokenCipher:
        return self.store.cipher

    def rotate(
        self,
        credential_id: CredentialId,
        *,
        force: bool = False,
        wait: float = 0.0,
        before_use: bool = False,
        seen_version: int | None = None,
    ) -> RotationResult:
        """Rotate if due (or unconditionally with ``force``), at most once per request.

        Args:
            credential_id: the credential.
            force: rotate even if fresh. Concurrent forced requests are merged: a request is
                satisfied by any rotation that commits after it was made.
            seen_version: for ``force``, the version the requester saw when it asked (a
                queued request is made when queued, not when run); read now if None.
            wait: seconds to wait for a lock held by another rotation; 0 gives up at once
                (the scheduled path: the holder is doing the work already).
            before_use: the caller is about to use the access token: rotate if it is due or
                about to expire, whatever the policy.
        """
        seen = seen_version
        if force and seen is None:
            seen = self.version_now(credential_id)
        self.replay_journal()
        result = self._rotate_uncounted(
            credential_id,
            self._lock_request(credential_id),
            force=force,
            wait=wait,
            before_use=before_use,
            seen=seen,
        )
        self._tally([result])
        return result

    def rotate_due(self, credential_ids: Sequence[CredentialId]) -> list[RotationResult]:
        """The scheduled rotation of several claimed credentials, one after the other.

        One credential's unexpected error is logged and reported, and the others go on: a
        task carries several credentials, and one bad record must not strand its neighbours.
        Each rotation takes the next one's lock in the round trip that commits it (or lets go
        of its lock), and their bookkeeping is written once, at the end. Each is told to
        ``beginning`` first: the worker stops renewing the credential's claim.
        """
        results = []
        requests = [self._lock_request(credential_id) for credential_id in credential_ids]
        mark: tuple[int, int, int] | None = None
        try:
            for credential_id, request, then in zip(
                credential_ids, requests, [*requests[1:], None], strict=True
            ):
                try:
                    for begin in self.beginning:
                        begin(credential_id)
                    previous, mark = mark, self._replay_and_mark()
                    if previous != mark:
                        # A pair was spilled or replayed since this lock was taken ahead,
                        # perhaps this credential's: the record it read may be old.
                        let_go_ahead(self.store.redis, request)
                    results.append(self._rotate_uncounted(credential_id, request, then=then))
                except Exception as error:
                    let_go_ahead(self.store.redis, request)
                    log.exception("rotation of %s failed", credential_id)
                    detail = _detail(error)
                    result = RotationResult(str(credential_id), Outcome.FAILED, detail=detail)
                    results.append(result)
        finally:
            # An interruption (a worker's hard shutdown) leaves no lock taken ahead behind.
            for request in requests:
                let_go_ahead(self.store.redis, request)
        self._tally(results)
        return results

    def _lock_request(self, credential_id: CredentialId) -> LockRequest:
        return LockRequest(str(credential_id), self.lock_ttl, self.rate_limit)

    def _replay_and_mark(self) -> tuple[int, int, int] | None:
        """Replay the journal; then its mark, which any later spill or replay changes.

        With nothing waiting, the mark is the one ``stat`` a rotation costs the journal.
        """
        mark = self.journal.mark()
        if not Journal.holds_entries(mark):
            return mark
        self.replay_journal()
        return self.journal.mark()

    def _rotate_uncounted(
        self,
        credential_id: CredentialId,
        request: LockRequest,
        *,
        force: bool = False,
        wait: float = 0.0,
        before_use: bool = False,
        seen: int | None = None,
        then: LockRequest | None = None,
    ) -> RotationResult:
        """Rotate under the credential's lock; the journal has been replayed just before.

        A pair waiting in the journal must be stored before its credential is rotated again:
        with nothing waiting, the replay is one ``stat``.
        """
        with single_flight(self.store.redis, request, wait, then=then) as flight:
            if not flight.acquired:
                return RotationResult(str(credential_id), Outcome.BUSY, detail="lock held")
            return self._rotate_locked(credential_id, flight, force, seen, before_use)

    def replay_journal(self) -> ReplayReport:
        """Store the pairs waiting in the journal; tell listeners of credentials brought back.

        A credential comes back when another host marked it, having tried the refresh token
        whose successor waited here (see :mod:`worker.journal`).
        """
        report = self.journal.replay(self.store)
        for credential_id, state in report.restored_over:
            self.notify(StateChange(credential_id, state, State.ACTIVE, None))
        return report

    def _tally(self, results: Sequence[RotationResult]) -> None:
        """Count outcomes, and successes for the incident guard, in two round trips.

        Bookkeeping, not state: a journaled rotation is safe while Redis is down, and its
        counts are not worth failing for.
        """
        outcomes = Counter(result.outcome.value for result in results)
        try:
            with self.store.redis.pipeline(transaction=False) as pipe:
                for outcome, count in outcomes.items():
                    pipe.hincrby(OUTCOME_COUNTERS, outcome, count)
                pipe.execute()
            if outcomes[Outcome.ROTATED]:
                self.guard.record_success(outcomes[Outcome.ROTATED])
        except RedisError:
            log.debug("outcomes %s not counted: Redis unreachable", dict(outcomes))

    def version_now(self, credential_id: CredentialId) -> int | None:
        """The stored version, read from the header alone; None if absent or unreadable."""
        data = self.store.raw(credential_id)
        try:
            return RawRecord.parse(data).version if data else None
        except CorruptRecordError:
            return None

    def _rotate_locked(
        self,
        credential_id: CredentialId,
        flight: Flight,
        force: bool,
        seen: int | None,
        before_use: bool,
    ) -> RotationResult:
        data = flight.record
        if data is None:
            return RotationResult(str(credential_id), Outcome.MISSING)
        try:
            credential = decode(credential_id, data, self.cipher)
        except CorruptRecordError as error:
            return self._corrupt(credential_id, error)
        except UndecryptableError as error:
            return self._undecryptable(credential_id, RawRecord.parse(data), error)
        if credential.state is State.UNDECRYPTABLE:
            credential = self._decryptable_again(credential)
        skip = self._reason_to_skip(credential, force, seen, before_use)
        if skip:
            return skip
        return self._refresh(credential, force, flight)

    def _reason_to_skip(
        self, credential: Credential, force: bool, seen: int | None, before_use: bool
    ) -> RotationResult | None:
        cid = str(credential.id)
        if not credential.expires:
            self._reschedule(credential, None)
            return RotationResult(cid, Outcome.NOT_EXPIRING, credential.version)
        if force:
            if seen is not None and credential.version > seen:
                return RotationResult(
                    cid, Outcome.LOST_RACE, credential.version, "rotated by another request"
                )
            return None
        return self._not_needed(credential, before_use)

    def _not_needed(self, credential: Credential, before_use: bool) -> RotationResult | None:
        """Why a scheduled (or before-use) rotation should not call Miro now, if it should not."""
        cid = str(credential.id)
        if credential.state is not State.ACTIVE:
            self._reschedule(credential, None)
            return RotationResult(cid, Outcome.INACTIVE, credential.version, credential.state)
        reason = self.guard.paused(max_age=PAUSE_READING_AGE)
        if reason:
            # Back at its own due time: the paused scan leaves it be, a resumed one takes it.
            due = self._reschedule(credential, self.policy.due_at(credential))
            return RotationResult(cid, Outcome.PAUSED, credential.version, reason, due)
        needed = self.policy.must_refresh_before_use if before_use else self.policy.is_due
        if not needed(credential, self.clock()):
            due = self._reschedule(credential, self.policy.due_at(credential))
            return RotationResult(cid, Outcome.SKIPPED_FRESH, credential.version, retry_at=due)
        return None

    def _refresh(self, credential: Credential, force: bool, flight: Flight) -> RotationResult:
        assert credential.refresh_token is not None
        try:
            flight.wait_for_slot()
            grant = self.client.refresh(credential.refresh_token, hide=[credential.access_token])
        except miro.Refused as error:
            return self._refused(credential, error, force)
        except miro.RateLimited as error:
            if flight.slot_spent:  # Miro's answer, not our own limit's: every worker holds back
                self.rate_limit.hold(self.store.redis, error.retry_at)
            return self._failed(credential, Outcome.RATE_LIMITED, error, error.retry_at)
        except miro.MiroError as error:
            return self._failed(credential, Outcome.RESCHEDULED, error)
        # From here until the commit, the new pair exists only in this process: touch
        # nothing but the commit itself. Its success is told to the guard by _tally; the
        # commit lets go of the lock.
        return self._commit(credential, self._rotated(credential, grant), flight)

    def refresh_keeping_lock(
        self, credential: Credential, flight: Flight
    ) -> tuple[RotationResult, Credential]:
        """Refresh and commit under a lock the caller keeps, and does not let go of.

        For a disconnect, which must revoke the new pair at Miro before anyone else may
        rotate it. The result is ``rotated`` when the pair is in Redis; else it waits in the
        journal (the lock kept to its TTL) or a reconnect replaced it.

        Raises:
            miro.MiroError: Miro did not rotate; a refusal is the caller's to judge.
        """
        assert credential.refresh_token is not None
        flight.wait_for_slot()
        grant = self.client.refresh(credential.refresh_token, hide=[credential.access_token])
        rotated = self._rotated(credential, grant)
        result = self._commit(credential, rotated, flight, keep_lock=True)
        self._tally([result])
        return result, rotated

    def _rotated(self, credential: Credential, grant: miro.TokenGrant) -> Credential:
        """The credential holding the pair Miro has just issued."""
        now = self.clock()
        return replace(
            credential,
            access_token=grant.access_token,
            # Miro always sends a new refresh token; if one day it does not, the old one lives on.
            refresh_token=grant.refresh_token or credential.refresh_token,
            access_expires_at=int(now + grant.expires_in) if grant.expires_in else None,
            refresh_expires_at=(
                int(now + self.refresh_token_lifetime)
                if grant.refresh_token
                else credential.refresh_expires_at
            ),
            scope=grant.scope or credential.scope,
            token_type=grant.token_type,
            version=credential.version + 1,
            state=State.ACTIVE,
            last_refresh_at=int(now),
            last_error=grant.warning,
            failure_count=0,
            refusals=0,
            successes_at_refusal=None,
        )

    def _commit(
        self, old: Credential, new: Credential, flight: Flight, *, keep_lock: bool = False
    ) -> RotationResult:
        cid = str(new.id)
        release = None if keep_lock else flight
        data = encode(new, self.cipher)
        due = self.policy.due_at(new)
        backoff = Backoff(self.commit_retry_seconds, self.clock)
        while True:
            try:
                written = self.store.write(new.id, str(old.version), data, due, release=release)
                break
            except RedisError as error:
                # Unreachable, or not taking writes for now: a replica after a failover
                # (READONLY), maxmemory (OOM), a failing disk (MISCONF). Any of them, past the
                # deadline, and the pair goes to disk with the lock still held (journal.py).
                if not backoff.waits:
                    log.warning("commit of %s refused (%s)", cid, redis_errors.describe(error))
                if not backoff.wait():
                    entry = JournalEntry(cid, str(old.version), data, due, flight.owner)
                    self.journal.spill(entry)
                    flight.keep()
                    return RotationResult(cid, Outcome.JOURNALED, new.version, retry_at=due)
        if not written:
            log.warning("rotation of %s superseded: the grant was replaced meanwhile", cid)
            return RotationResult(cid, Outcome.SUPERSEDED, old.version)
        if old.state is not State.ACTIVE:
            self.notify(StateChange(cid, old.state, State.ACTIVE, None))
        # DEBUG: at INFO, Celery's line for the task already names each id by its outcome, and
        # a second line per refresh cost 5 % of a worker's CPU.
        log.debug("rotated %s to version %d", cid, new.version)
        return RotationResult(cid, Outcome.ROTATED, new.version, new.last_error, due)

    def _refused(self, credential: Credential, error: miro.Refused, force: bool) -> RotationResult:
        """Judge a refusal by evidence, never by its wording (see the module's step 4)."""
        cid = str(credential.id)
        if self.version_now(credential.id) != credential.version:
            # Our refresh token was used by whoever committed the newer version.
            return RotationResult(cid, Outcome.LOST_RACE, detail="rotated by another process")
        evidence = weigh(self.client, credential, self.clock)
        reading = self.guard.record_refusal(cid, evidence)
        if reading.paused:
            # Backed off, not put back at its due time: the probe must move on to others.
            return self._failed(credential, Outcome.PAUSED, error)
        if evidence is Evidence.GRANT_ALIVE:
            return self._failed(credential, Outcome.RESCHEDULED, f"{GRANT_ALIVE} ({error})")
        return self._refused_grant(credential, error, force, evidence, reading.successes)

    def _refused_grant(
        self,
        credential: Credential,
        error: miro.Refused,
        force: bool,
        evidence: Evidence,
        successes: int,
    ) -> RotationResult:
        """The verdict on a refusal that may be the grant's: Miro honours no access token."""
        mark = credential.successes_at_refusal
        if mark is None or credential.refusals == 0:  # the first refusal
            if not force:
                when = self.clock() + self.confirm_delay
                return self._refused_again_at(credential, error, successes, when)
            mark = successes
        if evidence is Evidence.GRANT_DEAD:
            return self._needs_reauth(credential, error, "and no longer honours its access token")
        if successes > mark:
            return self._needs_reauth(credential, error, "again after other refreshes succeeded")
        return self._refused_again_at(credential, f"{UNCONFIRMED} ({error})", mark)

    def _refused_again_at(
        self,
        credential: Credential,
        error: miro.MiroError | str,
        mark: int,
        when: float | None = None,
    ) -> RotationResult:
        """Back off (or retry at ``when``), remembering the app's successes at the first refusal."""
        return self._failed(
            credential,
            Outcome.RESCHEDULED,
            error,
            when,
            refusals=credential.refusals + 1,
            successes_at_refusal=mark,
        )

    def _needs_reauth(
        self, credential: Credential, error: miro.Refused, why: str
    ) -> RotationResult:
        cid = str(credential.id)
        message = f"Miro refused the refresh {why} ({error}): the user must connect again"
        self._update_header(credential, None, state=State.NEEDS_REAUTH, last_error=message)
        log.error("credential %s needs re-authorization: %s", cid, message)
        if credential.state is not State.NEEDS_REAUTH:
            self.notify(StateChange(cid, credential.state, State.NEEDS_REAUTH, message))
        return RotationResult(cid, Outcome.NEEDS_REAUTH, credential.version, message)

    def _failed(
        self,
        credential: Credential,
        outcome: Outcome,
        error: miro.MiroError | str,
        when: float | None = None,
        *,
        refusals: int = 0,
        successes_at_refusal: int | None = None,
    ) -> RotationResult:
        failures = credential.failure_count
        if outcome is not Outcome.RATE_LIMITED:
            # A rate limit names its own time to come back and is no fault of this credential:
            # counted, a few 429s would double the backoff of its next real failure.
            failures += 1
        when = when or retry_at(
            credential, failures, self.clock(), access_last_chance=self.policy.access_last_chance
        )
        self._update_header(
            credential,
            when,
            last_error=str(error),
            failure_count=failures,
            refusals=refusals,
            successes_at_refusal=successes_at_refusal,
        )
        log.warning(
            "refresh of %s failed (%s), retry at %.0f: %s", credential.id, outcome, when, error
        )
        return RotationResult(str(credential.id), outcome, credential.version, str(error), when)

    def _corrupt(self, credential_id: CredentialId, error: Exception) -> RotationResult:
        when = self.clock() + CORRUPT_RETRY
        log.error("record of %s is corrupt (%s); reconnect or re-import it", credential_id, error)
        self.store.schedule(credential_id, when)
        return RotationResult(str(credential_id), Outcome.UNREADABLE, None, str(error), when)

    def _undecryptable(
        self, credential_id: CredentialId, raw: RawRecord, error: Exception
    ) -> RotationResult:
        failures = int(raw.header.get("fc", 0)) + 1
        when = self.clock() + min(300.0, 5.0 * 2**failures)
        self.store.write(
            credential_id,
            str(raw.version),
            raw.with_header(
                state=State.UNDECRYPTABLE, last_error=str(error), failure_count=failures
            ),
            when,
        )
        log.error("record of %s cannot be decrypted: %s", credential_id, error)
        return RotationResult(str(credential_id), Outcome.UNREADABLE, raw.version, str(error), when)

    def _decryptable_again(self, credential: Credential) -> Credential:
        """A record no key could decrypt does again: its key is back. Active, and on schedule.

        Its state is written at once, with its due time as an active credential's, whatever
        this rotation does next: a credential not due yet would otherwise be left off the
        schedule (an undecryptable one has no due time of its own).
        """
        active = replace(credential, state=State.ACTIVE, failure_count=0, last_error=None)
        due = self.policy.due_at(active)
        self._update_header(credential, due, state=State.ACTIVE, failure_count=0, last_error=None)
        log.warning("record of %s decrypts again: active", credential.id)
        self.notify(StateChange(str(credential.id), credential.state, State.ACTIVE, None))
        return active

    def _reschedule(self, credential: Credential, due: float | None) -> float | None:
        self._update_header(credential, due)
        return due

    def _update_header(self, credential: Credential, due: float | None, **changes: object) -> None:
        """Change bookkeeping fields and the due time, unless the pair changed meanwhile."""
        data = self.store.raw(credential.id)
        if data is None:
            return
        raw = RawRecord.parse(data)
        if raw.version == credential.version:
            self.store.write(credential.id, str(raw.version), raw.with_header(**changes), due)

    def notify(self, change: StateChange) -> None:
        """Tell every listener; a failing listener is logged, never raised."""
        for listener in self.listeners:
            try:
                listener(change)
            except Exception:
                log.exception("state-change listener %r failed", listener)


def _detail(error: Exception) -> str:
    """What a task's result says of an unexpected error; Redis may quote its arguments."""
    if isinstance(error, RedisError):
        return redis_errors.describe(error)
    return f"{type(error).__name__}: {error}"
