"""The service's settings, read from the environment once and validated up front.

Every setting is declared once, in ``SETTINGS`` below, with its default and the sentence the
README shows for it, so a bad value fails at start with a message that names the variable and
says what to do, instead of failing at 3 a.m. in the middle of a rotation.

Secrets may also come from files (``<NAME>_FILE`` for each name in ``SECRET_FILE_VARIABLES``,
e.g. ``MIRO_CLIENT_SECRET_FILE``) so container secrets never have to pass through the
environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.connection

from worker.hosts import host_name


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


# A URL may carry a password or a secret path (a webhook's): no message below quotes one.
def _url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
        _ = parts.port
    except ValueError:  # a bracket left open, a port that is not a number
        parts = None
    if parts is None or parts.scheme not in {"http", "https"} or not parts.netloc:
        raise SettingsError(f"{name} is not a URL; expected e.g. https://host[:port][/path]")
    return raw.rstrip("/")


REDIS_URL_FORM = "redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path"


def _redis_url(name: str, raw: str) -> str:
    """A URL redis-py can connect with, checked by its own parser."""
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"{name} is not a Redis URL; expected {REDIS_URL_FORM}")
    try:
        _ = urlsplit(raw).port
    except ValueError:
        # urllib's message quotes the port, where a password may have been put by mistake.
        raise SettingsError(
            f"{name} has a host or port that cannot be read; expected {REDIS_URL_FORM}"
        ) from None
    try:
        redis.connection.parse_url(raw)
    except ValueError as error:
        raise SettingsError(
            f"{name} is not a Redis URL ({error}); expected {REDIS_URL_FORM}"
        ) from None
    return raw


def _number(kind: Callable[[str], float]) -> Callable[[str, str], Any]:
    def parse(name: str, raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise SettingsError(f"{name}={raw!r} must be a finite number")
        if value < 0:
            raise SettingsError(f"{name}={raw!r} must not be negative")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in allowed:
            raise SettingsError(f"{name}={raw!r} must be one of: {', '.join(allowed)}")
        return raw

    return parse


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _login(name: str, raw: str) -> str:
    user, _, password = raw.partition(":")
    if not user or not password:
        raise SettingsError(f"{name} must look like user:password, both non-empty")
    return raw


def _host_names(name: str, raw: str) -> tuple[str, ...]:
    names = []
    for entry in filter(None, (entry.strip() for entry in raw.split(","))):
        host = host_name(entry)
        if host is None:
            raise SettingsError(
                f"{name}: {entry[:80]!r} is not a host name or address; expected e.g. "
                "miro-keeper.example.com,10.0.0.5 (no scheme, no path)"
            )
        names.append(host)
    return tuple(names)


#: A signing key shorter than this could be guessed, and with it any OAuth state forged.
MIN_SIGNING_KEY_CHARS = 32

#: A write of new grants is sent again for COMMIT_RETRY_SECONDS, plus one try's socket timeout,
#: and must end before its answer, kept 300 s (write_if_version.lua), expires.
MAX_COMMIT_RETRY_SECONDS = 240


def _signing_key(name: str, raw: str) -> str:
    if len(raw) < MIN_SIGNING_KEY_CHARS:
        raise SettingsError(
            f"{name} must be at least {MIN_SIGNING_KEY_CHARS} characters; generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return raw


@dataclass(frozen=True)
class Setting:
    """One environment variable: how to parse it, its default, and its README line."""

    parse: Callable[[str, str], Any]
    default: str | None
    doc: str
    secret: bool = False


_int = _number(int)
_float = _number(float)

SETTINGS: dict[str, Setting] = {
    "REDIS_URL": Setting(
        _redis_url,
        None,
        "Redis for the store, the broker and the results. Unset: an embedded Redis is started "
        "on 127.0.0.1 with its data in DATA_DIR and append-only persistence.",
    ),
    "EMBEDDED_REDIS_PORT": Setting(_int, "6479", "Port of the embedded Redis (REDIS_URL unset)."),
    "MIRO_CLIENT_ID": Setting(_text, None, "Your Miro app's client id."),
    "MIRO_CLIENT_SECRET": Setting(
        _text, None, "Your Miro app's client secret (or MIRO_CLIENT_SECRET_FILE).", secret=True
    ),
    "MIRO_REDIRECT_URI": Setting(
        _url, None, "The redirect URI registered in the Miro app's settings."
    ),
    "MIRO_API_URL": Setting(_url, "https://api.miro.com", "Base URL of Miro's REST API."),
    "MIRO_AUTH_URL": Setting(_url, "https://miro.com", "Base URL of Miro's authorize page."),
    "TOKEN_ENCRYPTION_KEYS": Setting(
        _text,
        None,
        "Comma-separated Fernet keys (or TOKEN_ENCRYPTION_KEYS_FILE): the first encrypts, all "
        "decrypt. Unset: a key is generated into DATA_DIR/encryption.key (mode 0600).",
        secret=True,
    ),
    "DATA_DIR": Setting(
        _path, "./var", "Embedded Redis data, the generated key and the rescue journal."
    ),
    "ACCESS_REFRESH_MARGIN": Setting(
        _int, "900", "Seconds before the access token expires at which it is refreshed."
    ),
    "REFRESH_TOKEN_MARGIN": Setting(
        _int, str(7 * 86400), "Seconds before the refresh token expires at which it is renewed."
    ),
    "REFRESH_TOKEN_LIFETIME": Setting(
        _int,
        str(60 * 86400),
        "How long Miro keeps a refresh token valid (60 days); Miro's responses do not say.",
    ),
    "REFRESH_POLICY": Setting(
        _choice("eager", "keepalive"),
        "eager",
        "eager: keep every access token fresh. keepalive: only keep refresh tokens alive and "
        "refresh access tokens on demand.",
    ),
    "HTTP_TIMEOUT": Setting(_float, "10", "Seconds for each call to Miro (connect and read)."),
    "LOCK_TTL": Setting(
        _float,
        "60",
        "Seconds a per-credential refresh lock lives; must exceed HTTP_TIMEOUT plus "
        "COMMIT_RETRY_SECONDS.",
    ),
    "COMMIT_RETRY_SECONDS": Setting(
        _float,
        "20",
        "How long a rotated pair is retried against an unreachable Redis before it is spilled "
        "to the journal in DATA_DIR; also how long a new grant's write (a code exchange, an "
        "import) is sent again before it fails.",
    ),
    # A tick that finds nothing due costs about a millisecond whatever the store's size
    # (bench/: scan cost), so scanning every second is cheap and keeps refreshes within about
    # a second of their due time instead of ten.
    "SCAN_INTERVAL": Setting(_float, "1", "Seconds between two scans for due credentials."),
    "SCAN_BATCH": Setting(_int, "5000", "Most credentials one scan claims."),
    # Celery's own work per task message (events, ack, bookkeeping) costs several times a
    # refresh's CPU (bench/: throughput), so the scan shares a message among a few credentials.
    "REFRESH_CHUNK": Setting(
        _int,
        "16",
        "Most credentials one scheduled refresh task rotates, one after the other; a tick with "
        "fewer due than WORKER_CONCURRENCY sends one each.",
    ),
    "CLAIM_LEASE": Setting(
        _int,
        "15",
        "Seconds a claimed credential is hidden from the scan; the worker holding it renews "
        "the claim until its rotation begins, so a credential whose worker died comes due "
        "again within this time.",
    ),
    "PROBE_INTERVAL": Setting(
        _int,
        "30",
        "While refreshing is paused by an incident, one probe refresh per this many seconds; "
        "the first success resumes.",
    ),
    "REFUSAL_CONFIRM_DELAY": Setting(
        _float,
        "30",
        "Seconds after Miro first refuses a credential's scheduled refresh at which it is tried "
        "again, before the credential can be marked needs_reauth.",
    ),
    "MIRO_TOKEN_RATE": Setting(
        _float, "50", "Calls per second to Miro's token endpoint, shared by all workers."
    ),
    "NOTIFY_WEBHOOK_URL": Setting(
        _url,
        None,
        "Receives a JSON POST {credential, state, error} when a credential needs re-authorization"
        " and when it recovers.",
    ),
    "WORKER_CONCURRENCY": Setting(_int, "64", "Threads per worker process."),
    "FLOWER_BASIC_AUTH": Setting(
        _login,
        None,
        "user:password for Flower (or FLOWER_BASIC_AUTH_FILE); required when Flower listens "
        "beyond localhost.",
        secret=True,
    ),
    "FLOWER_ALLOWED_HOSTS": Setting(
        _host_names,
        None,
        "Comma-separated host names Flower answers to besides the address it listens on (and "
        "localhost, when that is loopback or all interfaces); any other Host is refused (DNS "
        "rebinding).",
    ),
    "WEB_BASIC_AUTH": Setting(
        _login,
        None,
        "user:password for the web page (or WEB_BASIC_AUTH_FILE); required when it listens "
        "beyond localhost.",
        secret=True,
    ),
    "WEB_SECRET_KEY": Setting(
        _signing_key,
        None,
        "Key that signs the OAuth state and the web page's cookie (or WEB_SECRET_KEY_FILE). "
        "Unset: one is generated into DATA_DIR/web-secret.key (mode 0600).",
        secret=True,
    ),
    "WEB_ALLOWED_HOSTS": Setting(
        _host_names,
        None,
        "Comma-separated host names the web app answers to besides MIRO_REDIRECT_URI's host "
        "and the address it listens on; any other Host is refused (DNS rebinding).",
    ),
}

#: What identifies the Miro app; a call to Miro needs the first two.
MIRO_APP_VARIABLES = ("MIRO_CLIENT_ID", "MIRO_CLIENT_SECRET", "MIRO_REDIRECT_URI")

SECRET_FILE_VARIABLES = (
    "MIRO_CLIENT_SECRET",
    "TOKEN_ENCRYPTION_KEYS",
    "FLOWER_BASIC_AUTH",
    "WEB_BASIC_AUTH",
    "WEB_SECRET_KEY",
)


def _raw_value(name: str, environ: Mapping[str, str]) -> str | None:
    file_name = environ.get(f"{name}_FILE")
    if name in SECRET_FILE_VARIABLES and file_name:
        try:
            content = Path(file_name).read_text().strip()
        except OSError as error:
            raise SettingsError(
                f"{name}_FILE={file_name!r} cannot be read ({error.strerror}); "
                "point it at a readable file"
            ) from None
        if not content:
            raise SettingsError(f"{name}_FILE={file_name!r} is empty; put the value in it")
        return content
    value = environ.get(name, "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :meth:`from_env`; secrets are hidden from ``repr``."""

    redis_url: str | None = field(repr=False)
    embedded_redis_port: int
    miro_client_id: str | None
    miro_client_secret: str | None = field(repr=False)
    miro_redirect_uri: str | None
    miro_api_url: str
    miro_auth_url: str
    token_encryption_keys: str | None = field(repr=False)
    data_dir: Path
    access_refresh_margin: int
    refresh_token_margin: int
    refresh_token_lifetime: int
    refresh_policy: str
    http_timeout: float
    lock_ttl: float
    commit_retry_seconds: float
    scan_interval: float
    scan_batch: int
    refresh_chunk: int
    claim_lease: int
    probe_interval: int
    refusal_confirm_delay: float
    miro_token_rate: float
    notify_webhook_url: str | None
    worker_concurrency: int
    flower_basic_auth: str | None = field(repr=False)
    flower_allowed_hosts: tuple[str, ...] | None
    web_basic_auth: str | None = field(repr=False)
    web_secret_key: str | None = field(repr=False)
    web_allowed_hosts: tuple[str, ...] | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting.

        Raises:
            SettingsError: naming the first variable that is wrong and how to fix it.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, setting in SETTINGS.items():
            raw = _raw_value(name, environ)
            if raw is None:
                raw = setting.default
            values[name.lower()] = None if raw is None else setting.parse(name, raw)
        settings = cls(**values)
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if self.commit_retry_seconds > MAX_COMMIT_RETRY_SECONDS:
            raise SettingsError(
                f"COMMIT_RETRY_SECONDS={self.commit_retry_seconds:g} must be at most "
                f"{MAX_COMMIT_RETRY_SECONDS}: a write of new grants sent again later than that "
                "could outlive the answer Redis keeps for it, and store a spent token again"
            )
        if self.lock_ttl <= self.http_timeout + self.commit_retry_seconds:
            raise SettingsError(
                f"LOCK_TTL={self.lock_ttl:g} must exceed HTTP_TIMEOUT + COMMIT_RETRY_SECONDS "
                f"({self.http_timeout + self.commit_retry_seconds:g}), or two workers could "
                "refresh one credential at once"
            )
        if self.refresh_token_margin >= self.refresh_token_lifetime:
            raise SettingsError("REFRESH_TOKEN_MARGIN must be shorter than REFRESH_TOKEN_LIFETIME")
        self._check_recovery_fits_the_margins()
        if self.miro_token_rate <= 0:
            raise SettingsError(
                f"MIRO_TOKEN_RATE={self.miro_token_rate:g} must be above 0: it is the calls per "
                "second all workers together may make to Miro's token endpoint"
            )

    @property
    def recovery_seconds(self) -> float:
        """The longest a due credential can wait for its refresh when its worker dies.

        The scan claims it within a SCAN_INTERVAL of its due time. If the worker holding it
        dies, its claim, no longer renewed, runs out within CLAIM_LEASE, or, if the worker
        died inside the call to Miro, its lock within LOCK_TTL (the lock hides it from the
        scan while it lives); the next scan claims it again, and the retry's call to Miro
        takes up to HTTP_TIMEOUT.
        """
        return 2 * self.scan_interval + max(self.claim_lease, self.lock_ttl) + self.http_timeout

    def _check_recovery_fits_the_margins(self) -> None:
        """A credential whose worker died must be refreshed again before its token expires."""
        margins = {"REFRESH_TOKEN_MARGIN": self.refresh_token_margin}
        if self.refresh_policy == "eager":
            margins["ACCESS_REFRESH_MARGIN"] = self.access_refresh_margin
        for name, margin in margins.items():
            if self.recovery_seconds >= margin:
                raise SettingsError(
                    f"{name}={margin} is too short to refresh a credential again after the "
                    f"worker holding it died, which takes up to {self.recovery_seconds:g} s "
                    "(2 x SCAN_INTERVAL + the longer of CLAIM_LEASE and LOCK_TTL + "
                    f"HTTP_TIMEOUT): raise {name} above that, or lower CLAIM_LEASE or LOCK_TTL "
                    "(LOCK_TTL must stay above HTTP_TIMEOUT + COMMIT_RETRY_SECONDS)"
                )

    def require_miro_app(self, names: Sequence[str] = MIRO_APP_VARIABLES) -> None:
        """Fail clearly when a command needs the Miro app's credentials and they are unset."""
        for name in names:
            if getattr(self, name.lower()) is None:
                raise SettingsError(
                    f"{name} is not set; copy it from your Miro app's settings (or try the "
                    "service without one: run the demo, `python -m worker dev`, and add "
                    "--demo to the commands you run beside it)"
                )

    def as_environ(self) -> dict[str, str]:
        """The settings as environment variables, for the processes a launcher starts."""
        environ = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None:
                environ[item.name.upper()] = str(value)
        return environ


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once from ``os.environ``."""
    return Settings.from_env()
