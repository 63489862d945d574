"""The vault: the store, the Miro client and the rotator, wired from the settings.

One ``Vault`` per process. The CLI, the Celery tasks and the web app all go through it, so a
credential created by the callback, refreshed by a worker and read by ``token ID`` obeys the
same lock, the same compare-and-swap and the same schedule.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import redis

from settings import Settings
from worker import miro, redis_errors
from worker.credential import Credential, CredentialId, InvalidCredentialId, State
from worker.crypto import TokenCipher, UndecryptableError
from worker.evidence import Evidence, weigh
from worker.importer import BATCH, BadResponse, import_responses
from worker.incident import IncidentGuard, app_fingerprint
from worker.journal import Journal, KeptGrant, ReplayReport
from worker.lock import Flight, LockRequest, single_flight
from worker.notify import Webhook, log_state_change
from worker.outcomes import Listener, Outcome, RotationResult, StateChange
from worker.ratelimit import TokenRateLimit
from worker.record import CorruptRecordError, decode, encode
from worker.redis_server import ensure_embedded, warn_if_evicting, warn_without_persistence
from worker.rotation import Rotator
from worker.schedule import Policy
from worker.secret import Secret
from worker.store import CredentialStore, Put

log = logging.getLogger(__name__)

#: redis-py's own cap on a pool's connections, kept as the floor for processes without a
#: thread pool of their own size (the CLI, the web page, scripts with threads).
REDIS_DEFAULT_MAX_CONNECTIONS = 100
#: Connections beyond one per worker thread: the journal's replay thread, Celery's signal
#: handlers and the main thread.
REDIS_CONNECTIONS_SPARE = 16


class VaultError(RuntimeError):
    """A request the vault cannot serve; the message says why and what to do."""


class NotRevoked(VaultError):
    """Miro did not end the grant, or may not have: the credential is kept."""


class GrantKept(VaultError):
    """A new grant could not be stored yet; it waits in the journal, stored by a replay."""


#: Whom a kept grant's record is encoded for: a record does not hold its credential's id, so
#: the grant is stored under its own once Miro has named it.
UNNAMED = CredentialId("unnamed", "unnamed")


def redis_url(settings: Settings) -> str:
    """REDIS_URL, or the embedded Redis's URL (started first if no process has yet)."""
    return settings.redis_url or ensure_embedded(settings.data_dir, settings.embedded_redis_port)


def connect_redis(settings: Settings) -> redis.Redis:
    """A client for the configured Redis, or for the embedded one.

    Its pool has room for a connection per worker thread and the process's own threads:
    redis-py refuses any connection past its default of 100 at once ("Too many
    connections"), and a worker with more threads would fail rotations on it.
    """
    url = redis_url(settings)
    client = redis.Redis.from_url(
        url,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        max_connections=max(
            REDIS_DEFAULT_MAX_CONNECTIONS, settings.worker_concurrency + REDIS_CONNECTIONS_SPARE
        ),
    )
    try:
        warn_without_persistence(client, url)
        warn_if_evicting(client, url)
    except redis.ConnectionError as error:
        raise VaultError(f"cannot reach Redis at {urlsplit(url).hostname}: {error}") from None
    return client


@dataclass
class Vault:
    """Everything one process needs to keep credentials; build with :meth:`from_settings`."""

    settings: Settings
    store: CredentialStore
    client: miro.MiroClient
    policy: Policy
    rotator: Rotator
    clock: Callable[[], float] = time.time
    listeners: list[Listener] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings, redis_client: redis.Redis | None = None) -> Vault:
        redis_client = redis_client or connect_redis(settings)
        cipher = TokenCipher.from_settings(settings)
        store = CredentialStore(redis_client, cipher, settings.commit_retry_seconds)
        client = miro.MiroClient(settings)
        policy = Policy.from_settings(settings)
        listeners: list[Listener] = [log_state_change]
        if settings.notify_webhook_url:
            listeners.append(Webhook(settings.notify_webhook_url))
        rotator = Rotator(
            store=store,
            client=client,
            policy=policy,
            journal=Journal(settings.data_dir),
            lock_ttl=settings.lock_ttl,
            commit_retry_seconds=settings.commit_retry_seconds,
            refresh_token_lifetime=settings.refresh_token_lifetime,
            listeners=listeners,
            guard=IncidentGuard(
                redis_client,
                app=app_fingerprint(client.client_id, settings.miro_client_secret or ""),
                probe_interval=settings.probe_interval,
            ),
            rate_limit=TokenRateLimit(settings.miro_token_rate),
            confirm_delay=settings.refusal_confirm_delay,
        )
        vault = cls(settings, store, client, policy, rotator, listeners=listeners)
        vault.recover()
        return vault

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    def recover(self) -> ReplayReport:
        """Replay rotated pairs that an earlier run left in the journal; store kept grants."""
        report = self.rotator.replay_journal()
        if report.remaining:
            kept = self.rotator.journal.store_kept(self._store_kept)
            report = replace(report, remaining=report.remaining - kept)
        if report.applied or report.remaining:
            log.warning("journal replay: %s", report)
        return report

    def exchange(self, code: str) -> Credential:
        """Step 2 of Miro's guide: trade a code for a pair and store it.

        Once Miro has answered, the code is spent and the pair exists nowhere else: it is
        never dropped. An answer that names no user or team (Miro's refresh answers name no
        user; nothing promises an exchange's does) is named by Miro's token info. If that
        fails, or Redis does not take the pair, it is kept in the journal and stored by a
        later replay (:meth:`recover`).

        Raises:
            GrantKept: the grant waits in the journal.
        """
        self.settings.require_miro_app()
        self.recover()  # a grant kept earlier by this process: one stat when there is none
        grant = self.client.exchange_code(code)
        with contextlib.suppress(redis.RedisError):  # bookkeeping, not worth the pair
            self.rotator.guard.record_success()  # Miro accepts the app (see worker.incident)
        credential = self.new_credential(grant, UNNAMED)
        try:
            named = replace(credential, id=self._named(grant.team_id, grant.user_id, credential))
            [put] = self.store_new([named])
        except (miro.MiroError, VaultError, redis.RedisError) as error:
            kept = KeptGrant(encode(credential, self.store.cipher), grant.team_id, grant.user_id)
            self.rotator.journal.keep(kept)
            why = redis_errors.describe(error) if isinstance(error, redis.RedisError) else error
            raise GrantKept(
                f"Miro granted the connection, but it could not be stored yet ({why}); it is "
                "kept and stored once Miro names its user and Redis takes it: nothing to do"
            ) from None
        assert put is not None  # nothing is skipped unless asked
        return put.credential

    def _named(
        self, team_id: str | None, user_id: str | None, credential: Credential
    ) -> CredentialId:
        """The id of a new grant: the ids Miro's answer gave, the others asked of token info.

        Raises:
            miro.MiroError: token info could not be asked, or named no user or team.
            VaultError: an id is not one a credential can have.
        """
        if team_id is None or user_id is None:
            team, user = self.client.whose(credential.access_token, hide=[credential.refresh_token])
            team_id, user_id = team_id or team, user_id or user
        return _credential_id(team_id, user_id)

    def _store_kept(self, kept: KeptGrant) -> bool:
        """Name a kept grant and store it; False to keep it for the next replay.

        Raises:
            redis.RedisError: Redis did not take it (the journal keeps it).
        """
        try:
            credential = decode(UNNAMED, kept.record, self.store.cipher)
            credential = replace(credential, id=self._named(kept.team_id, kept.user_id, credential))
        except (miro.MiroError, VaultError, CorruptRecordError, UndecryptableError) as error:
            log.warning("a kept grant cannot be stored yet (%s); tried again later", error)
            return False
        self.store_new([credential])
        log.warning("kept grant stored as %s", credential.id)
        return True

    def import_response(self, body: Any) -> Credential:
        """Store a token response an integrator received from its own callback."""
        return self.store_grant(miro.parse_token_response(body))

    def import_many(
        self, bodies: Iterable[Any], batch: int = BATCH, *, skip_stored: bool = False
    ) -> list[Credential]:
        """:meth:`import_response` for many responses, all or nothing, ``batch`` per call.

        See :func:`worker.importer.import_responses`, which a migration calls with a file
        and several processes.

        Returns:
            The credentials stored.

        Raises:
            ImportRefused: a response is not one a credential can be made of; nothing was
                stored.
        """
        stored: list[Credential] = []
        import_responses(
            self, list(bodies), batch=batch, skip_stored=skip_stored, on_stored=stored.extend
        )
        return stored

    def named_grant(self, body: Any) -> tuple[miro.TokenGrant, CredentialId]:
        """The grant a token response makes, checked, and its credential's id.

        Raises:
            BadResponse: saying what is wrong with it.
        """
        try:
            grant = miro.parse_token_response(body)
            return grant, _credential_id(grant.team_id, grant.user_id)
        except (miro.MiroError, VaultError) as error:
            raise BadResponse(str(error)) from None

    def store_grant(self, grant: miro.TokenGrant) -> Credential:
        """Store a new grant, replacing (atomically) any earlier one of the same user and team."""
        credential_id = _credential_id(grant.team_id, grant.user_id)
        [put] = self.store_new([self.new_credential(grant, credential_id)])
        assert put is not None  # nothing is skipped unless asked
        return put.credential

    def store_new(
        self,
        credentials: list[Credential],
        *,
        read_first: bool = False,
        skip_stored: dict[CredentialId, str] | None = None,
    ) -> list[Put | None]:
        """Put new grants, bumping past stored versions; notify the users who came back.

        See :meth:`CredentialStore.put_many` for ``read_first`` and ``skip_stored``.
        """
        entries = [(c, self.policy.due_at(c)) for c in credentials]
        puts = self.store.put_many(entries, read_first=read_first, skip_stored=skip_stored)
        for put in puts:
            if put is not None:
                self._notify_recovered(put.credential.id, put.replaced)
        return puts

    def _notify_recovered(self, credential_id: CredentialId, replaced: State | None) -> None:
        if replaced not in (None, State.ACTIVE):  # a user back after needs_reauth: recovered
            self.rotator.notify(StateChange(str(credential_id), replaced, State.ACTIVE, None))

    def new_credential(self, grant: miro.TokenGrant, credential_id: CredentialId) -> Credential:
        """The credential a new grant makes."""
        now = int(self.clock())
        return Credential(
            id=credential_id,
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            access_expires_at=now + grant.expires_in if grant.expires_in else None,
            refresh_expires_at=(
                now + self.settings.refresh_token_lifetime if grant.refresh_token else None
            ),
            scope=grant.scope,
            token_type=grant.token_type,
            state=State.ACTIVE,
            created_at=now,
            last_refresh_at=now,
            last_error=grant.warning,
        )

    def rotate_now(
        self, credential_id: CredentialId, *, seen_version: int | None = None
    ) -> RotationResult:
        """Force a rotation in this process, waiting for one already running elsewhere.

        Requests made at once (that saw the same version) are merged into one refresh.
        """
        self.settings.require_miro_app()
        return self.rotator.rotate(
            credential_id, force=True, wait=self.settings.lock_ttl, seen_version=seen_version
        )

    def access_token(self, credential_id: CredentialId) -> Secret:
        """A valid access token, refreshed first (under the same lock) if due or expiring."""
        credential = self.store.load(credential_id)
        if self.policy.must_refresh_before_use(credential, self.clock()):
            result = self.rotator.rotate(
                credential_id, wait=self.settings.lock_ttl, before_use=True
            )
            credential = self.store.load(credential_id)
            if self.policy.access_expiring(credential, self.clock()):
                raise VaultError(
                    f"credential {credential_id} could not be refreshed ({result.outcome}: "
                    f"{result.detail})"
                )
        if credential.state is not State.ACTIVE:
            raise VaultError(
                f"credential {credential_id} is {credential.state}: {credential.last_error}"
            )
        return credential.access_token

    def revoke(self, credential_id: CredentialId) -> bool:
        """Disconnect: end the grant at Miro, then delete the credential.

        Held under the refresh lock, so no rotation swaps the tokens meanwhile. Miro may
        refuse to revoke an access token it no longer honours (expired, as with the
        ``keepalive`` policy) while the refresh token lives on for weeks: the refresh token
        is then traded for a new pair, committed first, and that one is revoked. The grant
        counts as gone at Miro only when Miro refuses the refresh too, and the refusals are
        shown to be the grant's, not those of a wrong client secret (worded alike).

        Returns:
            Whether Miro still knew the grant.

        Raises:
            miro.MiroError: Miro could not be asked (unreachable, 5xx, 429); the credential
                is kept (with its new pair, if Miro issued one), so the revoke can be tried
                again.
            NotRevoked: Miro refused, and the refusal may be the app's; or the new pair is
                not in Redis yet. The credential is kept.
        """
        self.settings.require_miro_app()
        request = LockRequest(str(credential_id), self.settings.lock_ttl, self.rotator.rate_limit)
        with single_flight(self.redis, request, wait=self.settings.lock_ttl) as flight:
            if not flight.acquired:
                raise VaultError(f"credential {credential_id} is being rotated; try again")
            known = self._end_grant(self.store.load(credential_id), flight)
            self.store.delete(credential_id)
        log.warning("credential %s revoked and deleted", credential_id)
        return known

    def _end_grant(self, credential: Credential, flight: Flight) -> bool:
        """End the credential's grant at Miro, under its lock; whether Miro still knew it."""
        try:
            self.client.revoke(credential.access_token, hide=[credential.refresh_token])
            return True
        except miro.Refused as refused:
            if credential.refresh_token is None:  # a token that never expires: nothing to renew
                self._confirm_gone(credential, refused)
                return False
        try:
            result, renewed = self.rotator.refresh_keeping_lock(credential, flight)
        except miro.Refused as refused:
            self._confirm_gone(credential, refused)
            return False
        if result.outcome is not Outcome.ROTATED:
            raise NotRevoked(
                f"Miro issued a new pair to revoke, but it is not stored yet ({result.outcome}: "
                f"{result.detail or 'see the log'}); run revoke again once Redis takes it"
            )
        try:
            self.client.revoke(renewed.access_token, hide=[renewed.refresh_token])
        except miro.Refused as refused:
            raise NotRevoked(
                f"Miro refused to revoke the pair it has just issued ({refused}); it is stored"
            ) from None
        return True

    def _confirm_gone(self, credential: Credential, refused: miro.Refused) -> None:
        """Return if the refusals show the grant gone; else raise: they may be the app's.

        Raises:
            NotRevoked: Miro honours the access token (the app is refused), or nothing shows
                the app's credentials right: no witness, no success lately.
        """
        evidence = weigh(self.client, credential, self.clock)
        if evidence is Evidence.GRANT_DEAD:
            return
        if evidence is Evidence.GRANT_ALIVE:
            raise NotRevoked(
                f"Miro refused to revoke or renew a grant whose access token it still honours "
                f"({refused}): it refuses the app's MIRO_CLIENT_ID or MIRO_CLIENT_SECRET; "
                "check them with `python -m worker doctor`"
            )
        if self.rotator.guard.success_lately() is None:
            raise NotRevoked(
                f"Miro refused the revoke and the refresh ({refused}), and no refresh succeeded "
                "lately to show that it accepts the app's client id and secret; check them with "
                "`python -m worker doctor`"
            )


def _credential_id(team_id: str | None, user_id: str | None) -> CredentialId:
    """The id of a grant of this team and user.

    Raises:
        VaultError: an id is missing or not one a credential can have.
    """
    if team_id is None or user_id is None:
        raise VaultError(
            "the token response lacks team_id or user_id; both are needed to name the "
            "credential: add the ids your callback received (Miro's token info, "
            "GET /v1/oauth-token with the access token, tells them)"
        )
    try:
        return CredentialId.of(team_id, user_id)
    except InvalidCredentialId as error:
        raise VaultError(str(error)) from None
