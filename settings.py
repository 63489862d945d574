"""The service's settings, read from the environment once and validated up front.

Every setting is declared once, as a field of :class:`Settings` made by :func:`setting`: its
type, parser, default, the sentence docs/settings.md shows for it, and whether it is a secret
or may come from a file (``<NAME>_FILE``, e.g. ``MIRO_CLIENT_SECRET_FILE``, so container
secrets never have to pass through the environment). Everything else is derived from those
fields. A bad value fails at start with a message that names the variable and says what to
do, instead of failing at 3 a.m. in the middle of a rotation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from functools import cache
from pathlib import Path
from types import MappingProxyType
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


#: What identifies the Miro app; a call to Miro needs the first two.
MIRO_APP_VARIABLES = ("MIRO_CLIENT_ID", "MIRO_CLIENT_SECRET", "MIRO_REDIRECT_URI")


class Group(StrEnum):
    """The sections of the settings' reference, in the order it shows them."""

    REDIS = "Redis"
    MIRO_APP = "The Miro app"
    KEYS_AND_DATA = "Keys and data"
    SCHEDULE = "The schedule"
    CALLS = "Calls to Miro, writes to Redis"
    WORKERS = "The workers"
    NOTIFICATIONS = "Notifications"
    WEB = "Flower and the web page"


Parser = Callable[[str, str], Any]


@dataclass(frozen=True)
class Setting:
    """What a field of :class:`Settings` knows about its environment variable."""

    parse: Parser
    #: The raw value used when the variable is unset or empty; None: the field is None.
    default: str | None
    #: The sentence an operator reads in docs/settings.md.
    doc: str
    group: Group
    #: Hidden from ``repr``.
    secret: bool
    #: Also read from the file named by ``<NAME>_FILE``.
    file: bool


_SETTING = "setting"


def setting(
    parse: Parser,
    default: str | None,
    doc: str,
    *,
    group: Group,
    secret: bool = False,
    file: bool = False,
) -> Any:
    """Declare a field of :class:`Settings`, read from the variable of its name in capitals.

    A value that may come from a file is a secret: it is hidden from ``repr`` too.
    """
    declared = Setting(parse, default, doc, group, secret or file, file)
    return field(repr=not declared.secret, metadata={_SETTING: declared})


_int = _number(int)
_float = _number(float)


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :meth:`from_env`; secrets are hidden from ``repr``.

    Each field is one environment variable, its name in capitals; its type is what the
    variable's parser returns.
    """

    redis_url: str | None = setting(
        _redis_url,
        None,
        "Redis for the store, the broker and the results, as "
        "`redis://[[user]:password@]host[:port][/db]`, `rediss://...` or `unix:///path`. Unset: "
        "an embedded Redis on 127.0.0.1:`EMBEDDED_REDIS_PORT`, data in `DATA_DIR`, "
        "`appendonly yes` + `appendfsync always`, a password generated into "
        "`DATA_DIR/redis.password` (mode 0600), no `CONFIG`, `MODULE` or `DEBUG`. A configured "
        "Redis without append-only persistence gets a warning at start.",
        group=Group.REDIS,
        secret=True,  # it may hold a password
    )
    embedded_redis_port: int = setting(
        _int, "6479", "Port of the embedded Redis (`REDIS_URL` unset).", group=Group.REDIS
    )
    miro_client_id: str | None = setting(
        _text,
        None,
        "Your Miro app's client id, from the app's settings at Miro. No command calls Miro while "
        "it is unset, and `make run` (`python -m worker dev`) runs the demo instead.",
        group=Group.MIRO_APP,
    )
    miro_client_secret: str | None = setting(
        _text,
        None,
        "Your Miro app's client secret, from the app's settings at Miro.",
        group=Group.MIRO_APP,
        file=True,
    )
    miro_redirect_uri: str | None = setting(
        _url,
        None,
        "The redirect URI registered in the Miro app's settings; the web app answers Miro's "
        "callback at its path (`https://` in production).",
        group=Group.MIRO_APP,
    )
    miro_api_url: str = setting(
        _url,
        "https://api.miro.com",
        "Base URL of Miro's REST API; point it at any Miro-compatible server.",
        group=Group.MIRO_APP,
    )
    miro_auth_url: str = setting(
        _url, "https://miro.com", "Base URL of Miro's authorize page.", group=Group.MIRO_APP
    )
    token_encryption_keys: str | None = setting(
        _text,
        None,
        "Comma-separated Fernet keys: the first encrypts, all decrypt (`python -m worker "
        "gen-key` makes one; `python -m worker rotate-key` moves every record to the first). "
        "Unset: a key is generated into `DATA_DIR/encryption.key` (mode 0600), with a warning "
        "when it is created: back that file up, without it every stored token is lost.",
        group=Group.KEYS_AND_DATA,
        file=True,
    )
    data_dir: Path = setting(
        _path,
        "./var",
        "The embedded Redis's data, the generated keys, the rescue journal, beat's schedule, "
        "Flower's history. Mode 0700 and its files 0600 whatever the umask; an existing "
        "directory open to others is made 0700, with a warning.",
        group=Group.KEYS_AND_DATA,
    )
    access_refresh_margin: int = setting(
        _int,
        "900",
        "Seconds before the access token expires at which it is refreshed. Under the `eager` "
        "policy it must exceed, as `REFRESH_TOKEN_MARGIN` must, the longest a credential waits "
        "for a retry after its worker died: 2 x `SCAN_INTERVAL` + the longer of `CLAIM_LEASE` "
        "and `LOCK_TTL` + `HTTP_TIMEOUT` (72 s by default).",
        group=Group.SCHEDULE,
    )
    refresh_token_margin: int = setting(
        _int,
        str(7 * 86400),
        "Seconds before the refresh token expires at which it is renewed (7 days); shorter "
        "than `REFRESH_TOKEN_LIFETIME`.",
        group=Group.SCHEDULE,
    )
    refresh_token_lifetime: int = setting(
        _int,
        str(60 * 86400),
        "How long Miro keeps a refresh token valid (60 days); Miro's answers do not carry it.",
        group=Group.SCHEDULE,
    )
    refresh_policy: str = setting(
        _choice("eager", "keepalive"),
        "eager",
        "`eager`: every access token is kept fresh. `keepalive`: only refresh tokens are kept "
        "alive (about one refresh per credential per 7 weeks instead of one per hour) and "
        "access tokens are refreshed on demand by `token`.",
        group=Group.SCHEDULE,
    )
    # A tick that finds nothing due costs about a millisecond whatever the store's size
    # (bench/: scan cost), so scanning every second is cheap and keeps refreshes within about
    # a second of their due time instead of ten.
    scan_interval: float = setting(
        _float, "1", "Seconds between two scans for due credentials.", group=Group.SCHEDULE
    )
    scan_batch: int = setting(
        _int,
        "5000",
        "Most credentials one scan claims (and most refreshes left waiting in the queue).",
        group=Group.SCHEDULE,
    )
    probe_interval: int = setting(
        _int,
        "30",
        "While refreshing is paused by an incident, one probe refresh per this many seconds; "
        "the first success resumes.",
        group=Group.SCHEDULE,
    )
    refusal_confirm_delay: float = setting(
        _float,
        "30",
        "Seconds after Miro first refuses a credential's scheduled refresh at which it is tried "
        "again, before the credential can be marked `needs_reauth`.",
        group=Group.SCHEDULE,
    )
    http_timeout: float = setting(
        _float, "10", "Seconds for each call to Miro (connect and read).", group=Group.CALLS
    )
    lock_ttl: float = setting(
        _float,
        "60",
        "Lifetime in seconds of a per-credential refresh lock, counted from the moment its "
        "`MIRO_TOKEN_RATE` slot comes due (a rotation waits up to 5 s for one, holding the "
        "lock); must exceed `HTTP_TIMEOUT` + `COMMIT_RETRY_SECONDS`. A task's rotation takes "
        "the next credential's lock with its commit, for a second longer; if the next rotation "
        "has not begun within that second, or the journal was written to meanwhile, it lets go "
        "of it and takes it anew.",
        group=Group.CALLS,
    )
    commit_retry_seconds: float = setting(
        _float,
        "20",
        "How long a rotated pair is retried against an unreachable Redis before it is spilled "
        "to the journal in `DATA_DIR`; also how long a write of new grants (a code exchange, "
        f"an import) is sent again before it fails. At most {MAX_COMMIT_RETRY_SECONDS}.",
        group=Group.CALLS,
    )
    miro_token_rate: float = setting(
        _float,
        "50",
        "Calls per second to Miro's token endpoint, shared by all workers; above 0.",
        group=Group.CALLS,
    )
    worker_concurrency: int = setting(
        _int,
        "64",
        "Threads per worker process (the process's Redis pool holds that many connections plus "
        "16, and never fewer than 100).",
        group=Group.WORKERS,
    )
    # Celery's own work per task message (events, ack, bookkeeping) costs several times a
    # refresh's CPU (bench/: throughput), so the scan shares a message among a few credentials.
    refresh_chunk: int = setting(
        _int,
        "16",
        "Most credentials one scheduled `refresh_due` task rotates, one after the other: "
        "Celery's own cost per task is several refreshes' worth of CPU. A tick with fewer due "
        "than `WORKER_CONCURRENCY` sends one per task.",
        group=Group.WORKERS,
    )
    claim_lease: int = setting(
        _int,
        "15",
        "Seconds a claimed credential is hidden from the scan. The worker holding it renews "
        "the claim until its rotation begins, so a credential whose worker died comes due "
        "again within this time. The scan leaves no more in the queue (where nobody renews "
        "them) than `MIRO_TOKEN_RATE` starts in half of it.",
        group=Group.WORKERS,
    )
    notify_webhook_url: str | None = setting(
        _url,
        None,
        "Receives a JSON POST `{credential, state, error}` when a credential needs "
        "re-authorization (`needs_reauth`) and when it recovers.",
        group=Group.NOTIFICATIONS,
    )
    flower_basic_auth: str | None = setting(
        _login,
        None,
        "`user:password` for Flower; Flower refuses to listen beyond localhost without it.",
        group=Group.WEB,
        file=True,
    )
    flower_allowed_hosts: tuple[str, ...] | None = setting(
        _host_names,
        None,
        "Comma-separated host names Flower answers to besides the address it listens on (and "
        "the loopback names, when that is loopback or all interfaces), e.g. the name a proxy "
        "uses; any other `Host` gets a 400 (DNS rebinding).",
        group=Group.WEB,
    )
    web_basic_auth: str | None = setting(
        _login,
        None,
        "`user:password` for the web page (all but the callback and `/healthz`); `python -m "
        "worker web` refuses to listen beyond localhost without it.",
        group=Group.WEB,
        file=True,
    )
    web_secret_key: str | None = setting(
        _signing_key,
        None,
        f"At least {MIN_SIGNING_KEY_CHARS} characters; signs the OAuth state and the web "
        "page's cookie. Unset: one is generated into `DATA_DIR/web-secret.key` (mode 0600); "
        "set it when the web app or `connect-url` run on more than one machine.",
        group=Group.WEB,
        file=True,
    )
    web_allowed_hosts: tuple[str, ...] | None = setting(
        _host_names,
        None,
        "Comma-separated host names the web app answers to besides the host of "
        "`MIRO_REDIRECT_URI` and the address it listens on (e.g. the name a proxy or an "
        "operator uses); any other `Host` gets a 400 (DNS rebinding).",
        group=Group.WEB,
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting.

        Raises:
            SettingsError: naming the first variable that is wrong and how to fix it.
        """
        environ = os.environ if environ is None else environ
        settings = cls(
            **{name.lower(): _value(name, declared, environ) for name, declared in SETTINGS.items()}
        )
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


#: Every setting by its variable's name, in declaration order: derived from the fields.
SETTINGS: Mapping[str, Setting] = MappingProxyType(
    {item.name.upper(): item.metadata[_SETTING] for item in fields(Settings)}
)


def file_variable(name: str) -> str:
    """The variable naming a file that holds the setting ``name``'s value."""
    return f"{name}_FILE"


def configuring_names() -> frozenset[str]:
    """Every variable that configures the service, ``<NAME>_FILE`` ones included."""
    files = (file_variable(name) for name, declared in SETTINGS.items() if declared.file)
    return frozenset((*SETTINGS, *files))


def _value(name: str, declared: Setting, environ: Mapping[str, str]) -> Any:
    """The parsed value of ``name``: from its file, else its variable, else its default."""
    raw = _from_file(name, environ) if declared.file else None
    raw = raw or environ.get(name, "").strip() or declared.default
    return None if raw is None else declared.parse(name, raw)


def _from_file(name: str, environ: Mapping[str, str]) -> str | None:
    variable = file_variable(name)
    path = environ.get(variable)
    if not path:
        return None
    try:
        content = Path(path).read_text().strip()
    except OSError as error:
        raise SettingsError(
            f"{variable}={path!r} cannot be read ({error.strerror}); point it at a readable file"
        ) from None
    if not content:
        raise SettingsError(f"{variable}={path!r} is empty; put the value in it")
    return content


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once from ``os.environ``."""
    return Settings.from_env()
