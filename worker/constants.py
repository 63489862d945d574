"""Every Redis key the service writes, in one place.

Credential ids are ``<team_id>:<user_id>``; :func:`worker.credential.CredentialId.parse`
guarantees they hold no glob characters, so a key can never escape its prefix or widen a SCAN.
"""

from typing import Final

NAMESPACE: Final = "mtk"

#: One compact string per credential: JSON header, newline, raw Fernet token.
CREDENTIAL_KEY: Final = NAMESPACE + ":cred:{id}"
CREDENTIAL_KEY_PATTERN: Final = NAMESPACE + ":cred:*"
CREDENTIAL_KEY_PREFIX: Final = NAMESPACE + ":cred:"

#: Sorted set: member = credential id, score = epoch second it is next due.
DUE_INDEX: Final = NAMESPACE + ":due"

#: Hash: state -> number of credentials in it, kept by the write scripts.
STATE_COUNTS: Final = NAMESPACE + ":states"

#: Sorted set of credentials that are failing or not active: id -> time of the last write.
FAILING: Final = NAMESPACE + ":failing"

#: The id index, kept by the scripts that create and delete records (see worker/idindex.py):
#: a set per team of its users' ids, for search by team...
ID_TEAM_KEY: Final = NAMESPACE + ":ids:team:{team}"
#: ...sorted sets (every score 0) of "<user_id>:<team_id>", the users bucketed by a hash of
#: their id, for search by user and the list of every credential...
ID_USER_BUCKET_KEY: Final = NAMESPACE + ":ids:user:{bucket}"
#: ...a bitmap of the user buckets in use, so that list skips the empty ones...
ID_BUCKETS_USED: Final = NAMESPACE + ":ids:used"
#: ...set once the index holds every stored credential (a store indexed since its first
#: record, or `python -m worker reindex` done)...
ID_INDEX_COMPLETE: Final = NAMESPACE + ":ids:complete"
#: ...and where `reindex` is in its SCAN of the records, so that a new run resumes there.
ID_REINDEX_CURSOR: Final = NAMESPACE + ":ids:reindex"

#: Single-flight lock of one credential's refresh, owned by a random token.
LOCK_KEY: Final = NAMESPACE + ":lock:{id}"

#: Set when refreshing is paused (an incident); holds the reason.
PAUSED_KEY: Final = NAMESPACE + ":paused"

#: Sets of the credentials whose refreshes Miro refused since the last success, all of them
#: and those whose access tokens it still honoured; they expire a window after the last one.
REFUSED_KEY: Final = NAMESPACE + ":refused"
REFUSED_ALIVE_KEY: Final = NAMESPACE + ":refused-alive"

#: Hash of one app's successes (a refresh or a code exchange): ``count`` and ``at`` (epoch
#: seconds), under a fingerprint of its client id and secret (see incident.py).
SUCCESS_KEY: Final = NAMESPACE + ":success:{app}"

#: Held for a probe interval by the one probe refresh allowed while paused.
PROBE_KEY: Final = NAMESPACE + ":probe"

#: Token bucket shared by every worker for calls to Miro's token endpoint.
RATE_LIMIT_KEY: Final = NAMESPACE + ":ratelimit:token"

#: Set when Miro answered 429: the epoch second its limit resets, before which no worker
#: calls the token endpoint; it expires soon after.
RATE_LIMIT_HOLD_KEY: Final = NAMESPACE + ":ratelimit:hold"

#: Hash of counters: refreshes by outcome.
OUTCOME_COUNTERS: Final = NAMESPACE + ":outcomes"

#: Set of the names of the workers that publish their capacity, each under WORKER_KEY.
WORKERS: Final = NAMESPACE + ":workers"

#: One worker's capacity report (JSON), expiring unless the worker publishes it again.
WORKER_KEY: Final = NAMESPACE + ":worker:{name}"

#: The answer of one call storing new grants, kept for minutes under a random name: the same
#: call sent again after its reply was lost gets it back (see write_if_version.lua).
ANSWER_KEY: Final = NAMESPACE + ":answer:{call}"

#: Celery's queue (a Redis list the broker owns): scheduled refreshes and forced rotations,
#: the only tasks there are (the scan runs inside beat).
REFRESH_QUEUE: Final = "celery"

#: Prefix of the OAuth states waiting for their callback: ``<prefix><nonce>``, single-use,
#: expiring with the state.
OAUTH_STATE_PREFIX: Final = NAMESPACE + ":oauth-state:"


def credential_key(credential_id: str) -> str:
    return CREDENTIAL_KEY.format(id=credential_id)


def team_ids_key(team_id: str) -> str:
    return ID_TEAM_KEY.format(team=team_id)


def user_bucket_key(bucket: int) -> str:
    return ID_USER_BUCKET_KEY.format(bucket=bucket)


def lock_key(credential_id: str) -> str:
    return LOCK_KEY.format(id=credential_id)


def answer_key(call: str) -> str:
    return ANSWER_KEY.format(call=call)


def success_key(app: str) -> str:
    return SUCCESS_KEY.format(app=app)


def worker_key(name: str) -> str:
    return WORKER_KEY.format(name=name)
