"""``python -m worker doctor``: what is wrong with this installation, and what to do about it.

Each check is a plain function that returns findings, so tests can run them one by one
against real servers. The checks do what an operator would: read the settings, try the
encryption keys on a sample of the stored records, ask Redis whether it reaches and persists,
weigh the refresh rate the stored credentials need against ``MIRO_TOKEN_RATE`` and the workers,
and ask whether Miro accepts the app's client id and secret (see :func:`check_miro`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from itertools import islice

import redis

from settings import Settings, SettingsError
from worker import miro, replies
from worker.capacity import WORKERS_SHORT, per_second, read_capacity
from worker.constants import CREDENTIAL_KEY_PATTERN
from worker.crypto import KEY_FILE_NAME, TokenCipher, UndecryptableError
from worker.human_time import human_time
from worker.incident import IncidentGuard, app_fingerprint
from worker.record import CorruptRecordError, RawRecord
from worker.redis_server import RedisUnavailableError
from worker.vault import redis_url

#: Most records whose encryption is checked: enough to see a missing key, cheap on millions.
KEY_SAMPLE = 1000


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    fix: str = ""


def check_settings(environ: Mapping[str, str]) -> tuple[Settings | None, list[Finding]]:
    """The settings, if they parse, and what is missing or risky in them."""
    try:
        settings = Settings.from_env(environ)
    except SettingsError as error:
        return None, [Finding("settings", Level.FAIL, str(error), "fix the variable it names")]
    try:
        settings.require_miro_app()
        findings = [Finding("settings", Level.OK, "valid; the Miro app is configured")]
    except SettingsError as error:
        findings = [Finding("settings", Level.FAIL, str(error))]
    if not settings.token_encryption_keys:
        findings.append(
            Finding(
                "settings",
                Level.WARN,
                f"TOKEN_ENCRYPTION_KEYS is unset: tokens are encrypted with the key generated "
                f"in {settings.data_dir / KEY_FILE_NAME}; lose that file and every token is lost",
                "put that key in TOKEN_ENCRYPTION_KEYS (or TOKEN_ENCRYPTION_KEYS_FILE) and back "
                "it up",
            )
        )
    return settings, findings


def check_redis(client: redis.Redis) -> Finding:
    """Whether Redis answers, and whether it writes an append-only file."""
    try:
        persistence = client.info("persistence")
    except redis.RedisError as error:
        return Finding(
            "redis", Level.FAIL, f"cannot reach Redis: {error}", "start it, or fix REDIS_URL"
        )
    if int(persistence.get("aof_enabled", 0)):
        return Finding("redis", Level.OK, "reachable, append-only persistence on")
    return Finding(
        "redis",
        Level.FAIL,
        "append-only persistence is off: a crash can lose rotated refresh tokens, and every "
        "such credential with them",
        "set `appendonly yes` in redis.conf (and `CONFIG SET appendonly yes` to apply it now)",
    )


def check_keys(settings: Settings, client: redis.Redis, sample: int = KEY_SAMPLE) -> Finding:
    """Which configured key decrypts each of a sample of the stored records."""
    try:
        cipher = _configured_cipher(settings)
    except SettingsError as error:
        return Finding("keys", Level.FAIL, str(error))
    counts: Counter[str] = Counter()
    for key in islice(client.scan_iter(match=CREDENTIAL_KEY_PATTERN, count=1000), sample):
        data = client.get(key)
        if data is not None:
            counts[_decrypting_key(cipher, replies.data(data))] += 1
    detail = (
        f"{counts.total()} records sampled: {counts['first']} decrypt with the first key, "
        f"{counts['other']} with another key, {counts['none']} with none, "
        f"{counts['corrupt']} corrupt"
    )
    if counts["none"] or counts["corrupt"]:
        fix = (
            "add the key those records were written with to TOKEN_ENCRYPTION_KEYS; corrupt "
            "records need their users to connect again"
        )
        return Finding("keys", Level.FAIL, detail, fix)
    if counts["other"]:
        fix = "run `python -m worker rotate-key`; keep the older keys until it says they can go"
        return Finding("keys", Level.WARN, detail, fix)
    return Finding("keys", Level.OK, detail)


def check_capacity(settings: Settings, client: redis.Redis) -> Finding:
    """Whether ``MIRO_TOKEN_RATE`` and the workers seen recently can serve the stored credentials.

    A rate limit below the need is a mistake in the settings; workers short of it are one if
    any run (more are needed), but none seen may only mean the doctor runs before they start.
    """
    figures, _ = read_capacity(client, settings)
    detail = (
        f"the stored credentials need {per_second(figures.needed)} refreshes; MIRO_TOKEN_RATE "
        f"allows {per_second(figures.token_rate)}; {figures.workers} workers seen can do "
        f"{per_second(figures.worker_capacity)}"
    )
    shortfalls = figures.shortfalls()
    if not shortfalls:
        return Finding("capacity", Level.OK, detail)
    only_no_worker = list(shortfalls) == [WORKERS_SHORT] and not figures.workers
    level = Level.WARN if only_no_worker else Level.FAIL
    return Finding("capacity", level, detail, "; ".join(shortfalls.values()))


def _configured_cipher(settings: Settings) -> TokenCipher | None:
    """The configured keys, without generating one (the doctor only looks)."""
    if settings.token_encryption_keys or (settings.data_dir / KEY_FILE_NAME).exists():
        return TokenCipher.from_settings(settings)
    return None


def _decrypting_key(cipher: TokenCipher | None, data: bytes) -> str:
    try:
        ciphertext = RawRecord.parse(data).ciphertext
    except CorruptRecordError:
        return "corrupt"
    if cipher is None:
        return "none"
    if cipher.is_primary(ciphertext):
        return "first"
    try:
        cipher.decrypt(ciphertext)
    except UndecryptableError:
        return "none"
    return "other"


def check_miro(settings: Settings, client: redis.Redis | None = None) -> Finding:
    """Whether Miro's token endpoint answers and accepts the app's client id and secret.

    Miro may word a wrong secret exactly as a refused code, so no refusal's wording is read.
    A refresh or code exchange that succeeded lately with these credentials proves them.
    Else one probe: a made-up code offered with the configured secret and with a made-up one;
    answers that differ prove Miro tells the secret from a wrong one. Answers alike tell
    nothing, and the finding says so instead of passing or failing.
    """
    if client is not None:
        try:
            proven = _proven_by_a_success(settings, client)
        except redis.RedisError:
            proven = None  # check_redis says why
        if proven:
            return proven
    return _compare_with_a_wrong_secret(settings)


def _proven_by_a_success(settings: Settings, client: redis.Redis) -> Finding | None:
    at = IncidentGuard(client, app=_fingerprint(settings)).success_lately()
    if at is None:
        return None
    detail = (
        f"a refresh or code exchange succeeded at {human_time(at, time.time())} with this "
        "client id and secret"
    )
    return Finding("miro", Level.OK, detail)


def _fingerprint(settings: Settings) -> str:
    return app_fingerprint(settings.miro_client_id or "", settings.miro_client_secret or "")


def _compare_with_a_wrong_secret(settings: Settings) -> Finding:
    """One made-up code, offered with the configured secret and then with a made-up one.

    The made-up secret is sent once per run, and only after the configured one was answered
    with a refusal: nothing suggests Miro locks an app out for one wrong secret.
    """
    code = f"doctor-{secrets.token_urlsafe(16)}"
    configured = _answer(miro.MiroClient(settings), code)
    if not isinstance(configured, miro.Refused):
        return _unusable(settings, configured)
    wrong = replace(settings, miro_client_secret=f"doctor-{secrets.token_urlsafe(24)}")
    made_up = _answer(miro.MiroClient(wrong), code)
    if not isinstance(made_up, miro.Refused):
        return _unusable(settings, made_up)
    if (configured.status, configured.reason) != (made_up.status, made_up.reason):
        detail = (
            f"Miro tells this client secret from a wrong one: a made-up code is answered "
            f"{configured}; with a wrong secret, {made_up}"
        )
        return Finding("miro", Level.OK, detail)
    detail = (
        f"cannot tell: Miro answers this client secret exactly as a made-up one ({configured}): "
        "either it is wrong, or Miro words every refusal alike"
    )
    fix = (
        "run `python -m worker rotate ID --now` on one credential: a success proves "
        "MIRO_CLIENT_ID and MIRO_CLIENT_SECRET (and doctor says so for a while); a refusal "
        "there too means they are wrong: copy them from the app at Miro"
    )
    return Finding("miro", Level.WARN, detail, fix)


def _answer(client: miro.MiroClient, code: str) -> miro.MiroError | None:
    """How Miro answers the exchange of ``code``: its error, or None if it accepted it."""
    try:
        client.exchange_code(code)
    except miro.MiroError as error:
        return error
    return None


def _unusable(settings: Settings, answer: miro.MiroError | None) -> Finding:
    """The finding for an answer that is no refusal: accepted, rate limited or none."""
    if answer is None:
        fix = "point MIRO_API_URL at Miro (https://api.miro.com)"
        return Finding("miro", Level.FAIL, "the token endpoint accepted a made-up code", fix)
    if isinstance(answer, miro.RateLimited):
        return Finding("miro", Level.WARN, f"rate limited, cannot tell: {answer}", "run it later")
    fix = f"check MIRO_API_URL ({settings.miro_api_url}) and the network path to it"
    return Finding("miro", Level.FAIL, f"no usable answer: {answer}", fix)


def run(environ: Mapping[str, str] | None = None) -> list[Finding]:
    """Every check that can run: each needs the settings, the keys also need Redis."""
    settings, findings = check_settings(os.environ if environ is None else environ)
    if settings is None:
        return findings
    try:
        url = redis_url(settings)
    except RedisUnavailableError as error:
        return [*findings, Finding("redis", Level.FAIL, str(error), "set REDIS_URL")]
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    findings.append(check_redis(client))
    with contextlib.suppress(redis.RedisError):  # unreachable: check_redis said so
        findings.append(check_keys(settings, client))
        findings.append(check_capacity(settings, client))
    if settings.miro_client_id and settings.miro_client_secret:
        findings.append(check_miro(settings, client))  # asks Redis for a recent success first
    client.close()
    return findings


def report(findings: list[Finding]) -> str:
    """The findings as lines an operator reads top to bottom, each fix under its problem."""
    lines = []
    for finding in findings:
        lines.append(f"{finding.level.upper():<5} {finding.check:<9} {finding.detail}")
        if finding.fix and finding.level is not Level.OK:
            lines.append(f"{'':<16}fix: {finding.fix}")
    return "\n".join(lines)
