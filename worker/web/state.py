"""The OAuth ``state`` of a connect: random, signed, single-use, expiring, maybe browser-bound.

Miro hands the ``state`` back untouched to the callback; it is what proves that a callback
answers an authorization this service started. Without it anyone could send a user's browser
to the callback with a code of their own and plant their Miro account in the store (login
CSRF). Two kinds exist, checked by the one callback:

- **browser** (``GET /connect``): the state's nonce also goes into the browser's signed
  cookie, and the callback accepts the state only together with that cookie.
- **link** (``python -m worker connect-url``): an operator sends the link to a user whose
  browser has never seen the service, so no cookie can bind it; whoever holds it may use it,
  once.

Every state is signed with the server's secret (a tampered state, or one signed with another
key, fails before Redis is asked), carries its issue time (refused after ``STATE_TTL``) and is
stored in Redis under its nonce, which the callback deletes: a state works once, whichever
process or machine issued it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadData, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from redis import Redis

from settings import Settings
from worker.constants import OAUTH_STATE_PREFIX
from worker.credential import CredentialId
from worker.datadir import read_or_create
from worker.miro import MiroClient

log = logging.getLogger(__name__)

#: Seconds a state is accepted: as long as Miro keeps an authorization code.
STATE_TTL = 600
#: Where the signing key is generated when WEB_SECRET_KEY is unset.
SECRET_FILE_NAME = "web-secret.key"
_SALT = "mtk-oauth-state"
_NONCE_BYTES = 24


class StateError(Exception):
    """A callback's state cannot be accepted; the message tells the user what to do."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IssuedState:
    #: The ``state`` parameter of the authorize link.
    token: str
    #: What the browser's cookie must hold for a browser-bound state.
    nonce: str


class _ClockedSigner(TimestampSigner):
    """itsdangerous' timestamp signer reading a given clock, so expiry can be tested."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class OAuthStates:
    """Issues states and accepts each one once; shared by the web app and the CLI."""

    def __init__(
        self,
        redis: Redis,
        secret_key: str,
        *,
        ttl: int = STATE_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self._serializer = URLSafeTimedSerializer(
            secret_key, salt=_SALT, signer=_ClockedSigner, signer_kwargs={"clock": clock}
        )

    def issue(self, *, browser: bool) -> IssuedState:
        """A new state, bound to a browser's cookie or not (an operator's link)."""
        nonce = secrets.token_urlsafe(_NONCE_BYTES)
        self.redis.set(OAUTH_STATE_PREFIX + nonce, b"1", ex=self.ttl)
        return IssuedState(self._serializer.dumps({"n": nonce, "b": browser}), nonce)

    def consume(self, token: str | None, browser_nonce: str | None) -> None:
        """Accept a state once.

        A state presented by another browser is refused without being spent, so the browser
        that started the connect can still finish it.

        Args:
            token: the ``state`` parameter of the callback.
            browser_nonce: the nonce in the browser's cookie, if it has one.

        Raises:
            StateError: missing, altered, expired, from another browser, or already used.
        """
        if not token:
            raise StateError(
                "The link carries no state, so it cannot be matched to a connect started "
                "here. Start again from the page or from a new connect link."
            )
        try:
            payload = self._serializer.loads(token, max_age=self.ttl)
        except SignatureExpired:
            raise StateError(
                f"This connect link is older than {self.ttl // 60} minutes. Start again."
            ) from None
        except BadData:
            raise StateError(
                "This link's state was not issued by this service (it was altered, or signed "
                "with another WEB_SECRET_KEY). Start again."
            ) from None
        nonce = payload["n"]
        if payload["b"] and not (browser_nonce and hmac.compare_digest(nonce, browser_nonce)):
            raise StateError(
                "This connect was started in another browser (or its cookie is gone). "
                "Start again in this browser.",
                status=403,
            )
        if not self.redis.delete(OAUTH_STATE_PREFIX + nonce):
            raise StateError("This connect link was used already. Start again.")


def authorize_link(
    client: MiroClient, states: OAuthStates, *, browser: bool, team_id: str | None = None
) -> tuple[str, IssuedState]:
    """Miro's authorize link with a new state; ``team_id`` preselects the team.

    Raises:
        InvalidCredentialId: ``team_id`` is not a plain Miro id.
    """
    team = CredentialId.of(team_id, "0").team_id if team_id else None
    issued = states.issue(browser=browser)
    return client.authorize_url(issued.token, team), issued


def secret_key(settings: Settings) -> str:
    """WEB_SECRET_KEY, or the key generated into DATA_DIR, shared by every process there."""
    if settings.web_secret_key:
        return settings.web_secret_key
    path = settings.data_dir / SECRET_FILE_NAME
    key, created = read_or_create(path, secrets.token_urlsafe(32))
    if created:
        log.warning(
            "WEB_SECRET_KEY is not set: generated one in %s. Set WEB_SECRET_KEY when the web "
            "app or `connect-url` run on more than one machine.",
            path,
        )
    return key
