"""Whose fault a refused refresh is, asked of Miro without spending anything.

Miro may word every refusal alike, so a refused refresh alone cannot tell a user who removed
the app from a wrong client secret. The credential's own access token can: Miro's token info
(``GET /v1/oauth-token``) needs no client secret and spends no token. If Miro still honours
the access token, the grant is alive and the app (or Miro) is at fault; if it refuses it too,
the grant is gone. An access token that has expired, or is about to, is no witness: Miro
would refuse it whatever the grant's fate.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from worker import miro
from worker.credential import Credential

#: Seconds our clock may be ahead of Miro's: a token closer to its expiry is no witness.
CLOCK_SKEW = 5.0


class Evidence(StrEnum):
    #: Miro still honours the access token: the grant lives, the refusal is the app's doing.
    GRANT_ALIVE = "grant_alive"
    #: Miro refuses the access token too: the grant is gone (removed, revoked or rotated away).
    GRANT_DEAD = "grant_dead"
    #: No witness: the access token has expired (or is about to), or Miro gave no answer.
    NONE = "none"


def weigh(client: miro.MiroClient, credential: Credential, clock: Callable[[], float]) -> Evidence:
    """What Miro says of the credential's access token, after a refusal of its refresh.

    A token that expires while Miro looks would read as a dead grant: a refusal counts only
    if the token still had ``CLOCK_SKEW`` to live when the answer came. A token that never
    expires always testifies.
    """
    if not _testifies(credential, clock()):
        return Evidence.NONE
    try:
        client.token_info(credential.access_token, hide=[credential.refresh_token])
    except miro.Refused:
        return Evidence.GRANT_DEAD if _testifies(credential, clock()) else Evidence.NONE
    except miro.MiroError:
        return Evidence.NONE
    return Evidence.GRANT_ALIVE


def _testifies(credential: Credential, now: float) -> bool:
    expires_at = credential.access_expires_at
    return expires_at is None or now + CLOCK_SKEW < expires_at
