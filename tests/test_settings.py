"""Settings: defaults, one clear error per bad value, secrets from files, secrets out of repr."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from settings import SETTINGS, Settings, SettingsError, configuring_names


def test_defaults_when_nothing_is_set() -> None:
    settings = Settings.from_env({})

    assert settings.redis_url is None
    assert settings.embedded_redis_port == 6479
    assert settings.miro_client_id is None and settings.miro_client_secret is None
    assert settings.miro_api_url == "https://api.miro.com"
    assert settings.miro_auth_url == "https://miro.com"
    assert settings.token_encryption_keys is None
    assert settings.data_dir == Path("./var").resolve()
    assert settings.access_refresh_margin == 900
    assert settings.refresh_token_margin == 7 * 86400
    assert settings.refresh_token_lifetime == 60 * 86400
    assert settings.refresh_policy == "eager"
    assert (settings.http_timeout, settings.lock_ttl, settings.commit_retry_seconds) == (10, 60, 20)
    assert settings.scan_batch == 5000 and settings.claim_lease == 15
    assert settings.refresh_chunk == 16
    assert settings.worker_concurrency == 64
    assert settings.flower_basic_auth is None and settings.notify_webhook_url is None


def test_values_are_parsed_to_their_types_and_urls_lose_a_trailing_slash() -> None:
    settings = Settings.from_env(
        {"HTTP_TIMEOUT": " 2.5 ", "SCAN_BATCH": "7", "MIRO_API_URL": "http://127.0.0.1:9/"}
    )
    assert settings.http_timeout == 2.5
    assert settings.scan_batch == 7
    assert settings.miro_api_url == "http://127.0.0.1:9"


def test_an_empty_variable_means_its_default() -> None:
    assert Settings.from_env({"SCAN_BATCH": "  "}).scan_batch == 5000


@pytest.mark.parametrize(
    ("name", "raw", "words"),
    [
        ("SCAN_BATCH", "many", "is not an? int"),
        ("SCAN_BATCH", "1.5", "is not an? int"),
        ("HTTP_TIMEOUT", "ten", "is not a float"),
        ("ACCESS_REFRESH_MARGIN", "-1", "must not be negative"),
        ("COMMIT_RETRY_SECONDS", "-0.5", "must not be negative"),
        ("REDIS_URL", "localhost:6379", "is not a Redis URL"),
        ("REDIS_URL", "http://localhost:6379", "is not a Redis URL"),
        ("MIRO_API_URL", "ftp://api.miro.com", "is not a URL"),
        ("NOTIFY_WEBHOOK_URL", "https://", "is not a URL"),
        ("REFRESH_POLICY", "lazy", "must be one of: eager, keepalive"),
    ],
)
def test_a_bad_value_raises_an_error_naming_the_variable(name: str, raw: str, words: str) -> None:
    with pytest.raises(SettingsError, match=name) as error:
        Settings.from_env({name: raw})
    assert re.search(words, str(error.value))


def test_nan_is_not_a_number_of_seconds() -> None:
    with pytest.raises(SettingsError, match="HTTP_TIMEOUT"):
        Settings.from_env({"HTTP_TIMEOUT": "nan"})


@pytest.mark.parametrize(
    "environ",
    [
        {"LOCK_TTL": "30"},  # equal to 10 + 20: not above
        {"LOCK_TTL": "15", "HTTP_TIMEOUT": "10", "COMMIT_RETRY_SECONDS": "5"},
        {"HTTP_TIMEOUT": "50"},
    ],
)
def test_lock_ttl_must_exceed_http_timeout_plus_commit_retries(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=r"LOCK_TTL=.*HTTP_TIMEOUT \+ COMMIT_RETRY_SECONDS"):
        Settings.from_env(environ)


def test_commit_retries_must_end_before_the_answer_redis_keeps_expires() -> None:
    environ = {"LOCK_TTL": "260", "COMMIT_RETRY_SECONDS": "241"}
    with pytest.raises(SettingsError, match="COMMIT_RETRY_SECONDS=241 must be at most 240"):
        Settings.from_env(environ)
    assert Settings.from_env({**environ, "COMMIT_RETRY_SECONDS": "240"}).commit_retry_seconds == 240


def test_lock_ttl_just_above_the_sum_is_accepted() -> None:
    assert Settings.from_env({"LOCK_TTL": "30.5"}).lock_ttl == 30.5


#: Timeouts that let LOCK_TTL be short: it must exceed HTTP_TIMEOUT + COMMIT_RETRY_SECONDS.
SHORT = {"HTTP_TIMEOUT": "5", "COMMIT_RETRY_SECONDS": "2", "LOCK_TTL": "8", "SCAN_INTERVAL": "1"}


def test_a_lease_longer_than_the_margin_is_refused_naming_the_fix() -> None:
    """The settings of a chaos run whose killed worker's credentials expired unrefreshed."""
    environ = {"ACCESS_REFRESH_MARGIN": "45", "SCAN_INTERVAL": "1", "CLAIM_LEASE": "300"}

    with pytest.raises(SettingsError) as error:
        Settings.from_env(environ)

    message = str(error.value)
    assert "ACCESS_REFRESH_MARGIN=45 is too short" in message
    assert "raise ACCESS_REFRESH_MARGIN above that, or lower CLAIM_LEASE or LOCK_TTL" in message


@pytest.mark.parametrize(
    ("lease", "recovery"),
    [
        ("10", 17),  # 2 scans + the lease + HTTP_TIMEOUT
        ("4", 15),  # 2 scans + LOCK_TTL, the longer, + HTTP_TIMEOUT
    ],
)
def test_the_margin_must_exceed_the_time_to_retry_after_a_dead_worker(
    lease: str, recovery: float
) -> None:
    environ = {**SHORT, "CLAIM_LEASE": lease}

    with pytest.raises(SettingsError, match=f"takes up to {recovery:g} s"):
        Settings.from_env({**environ, "ACCESS_REFRESH_MARGIN": str(recovery)})
    settings = Settings.from_env({**environ, "ACCESS_REFRESH_MARGIN": str(recovery + 1)})
    assert settings.recovery_seconds == recovery


def test_without_eager_refreshes_only_the_refresh_token_margin_must_leave_room() -> None:
    environ = {**SHORT, "REFRESH_POLICY": "keepalive", "ACCESS_REFRESH_MARGIN": "10"}

    assert Settings.from_env(environ).access_refresh_margin == 10
    with pytest.raises(SettingsError, match="REFRESH_TOKEN_MARGIN=20 is too short"):
        Settings.from_env({**environ, "REFRESH_TOKEN_MARGIN": "20"})


def test_a_token_rate_of_zero_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"MIRO_TOKEN_RATE=0 must be above 0"):
        Settings.from_env({"MIRO_TOKEN_RATE": "0"})


def test_refresh_token_margin_must_be_shorter_than_its_lifetime() -> None:
    with pytest.raises(SettingsError, match="REFRESH_TOKEN_MARGIN"):
        Settings.from_env({"REFRESH_TOKEN_MARGIN": "100", "REFRESH_TOKEN_LIFETIME": "100"})


@pytest.mark.parametrize("raw", ["admin", ":password"])
def test_flower_basic_auth_must_look_like_user_colon_password(raw: str) -> None:
    with pytest.raises(SettingsError, match="FLOWER_BASIC_AUTH must look like user:password"):
        Settings.from_env({"FLOWER_BASIC_AUTH": raw})


def test_flower_basic_auth_with_an_empty_password_is_refused() -> None:
    with pytest.raises(SettingsError, match="FLOWER_BASIC_AUTH"):
        Settings.from_env({"FLOWER_BASIC_AUTH": "admin:"})


def test_flower_basic_auth_is_kept_as_given() -> None:
    login = f"admin:{secrets.token_urlsafe(12)}"
    assert Settings.from_env({"FLOWER_BASIC_AUTH": login}).flower_basic_auth == login


def test_secrets_are_read_from_their_file_variables(tmp_path: Path) -> None:
    secret, key = secrets.token_urlsafe(24), Fernet.generate_key().decode()
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "keys").write_text(f"{key}\n")

    settings = Settings.from_env(
        {
            "MIRO_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
            "TOKEN_ENCRYPTION_KEYS_FILE": str(tmp_path / "keys"),
        }
    )

    assert settings.miro_client_secret == secret
    assert settings.token_encryption_keys == key


def test_a_file_variable_wins_over_the_plain_variable(tmp_path: Path) -> None:
    from_file = secrets.token_urlsafe(24)
    (tmp_path / "secret").write_text(from_file)
    settings = Settings.from_env(
        {"MIRO_CLIENT_SECRET": "from-env", "MIRO_CLIENT_SECRET_FILE": str(tmp_path / "secret")}
    )
    assert settings.miro_client_secret == from_file


@pytest.mark.parametrize("name", ["MIRO_CLIENT_SECRET", "TOKEN_ENCRYPTION_KEYS"])
def test_an_unreadable_secret_file_names_the_variable_and_the_cause(
    tmp_path: Path, name: str
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SettingsError) as error:
        Settings.from_env({f"{name}_FILE": str(missing)})
    message = str(error.value)
    assert f"{name}_FILE" in message
    assert str(missing) in message
    assert "No such file or directory" in message


def test_an_empty_secret_file_does_not_count_as_a_client_secret(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("\n")
    environ = {
        "MIRO_CLIENT_ID": "1",
        "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/cb",
        "MIRO_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
    }
    with pytest.raises(SettingsError, match="MIRO_CLIENT_SECRET"):
        Settings.from_env(environ).require_miro_app()


@pytest.mark.parametrize("missing", ["MIRO_CLIENT_ID", "MIRO_CLIENT_SECRET", "MIRO_REDIRECT_URI"])
def test_require_miro_app_names_the_missing_variable(missing: str) -> None:
    environ = {
        "MIRO_CLIENT_ID": "3458764500000000001",
        "MIRO_CLIENT_SECRET": secrets.token_urlsafe(24),
        "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/oauth/callback",
    }
    del environ[missing]
    with pytest.raises(SettingsError, match=f"^{missing} is not set"):
        Settings.from_env(environ).require_miro_app()


def test_require_miro_app_passes_when_all_are_set() -> None:
    settings = Settings.from_env(
        {
            "MIRO_CLIENT_ID": "1",
            "MIRO_CLIENT_SECRET": secrets.token_urlsafe(24),
            "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/cb",
        }
    )
    settings.require_miro_app()
    assert settings.miro_client_id == "1"


#: A valid value of each secret setting, which repr must hide.
SECRET_VALUES = {
    "REDIS_URL": f"redis://:{secrets.token_urlsafe(16)}@localhost:6379/0",
    "MIRO_CLIENT_SECRET": secrets.token_urlsafe(24),
    "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    "FLOWER_BASIC_AUTH": f"admin:{secrets.token_urlsafe(12)}",
    "WEB_BASIC_AUTH": f"operator:{secrets.token_urlsafe(12)}",
    "WEB_SECRET_KEY": secrets.token_urlsafe(32),
}


def test_the_five_secrets_declared_so_and_only_they_come_from_files(tmp_path: Path) -> None:
    file_variables = {name for name in configuring_names() if name.endswith("_FILE")}
    assert file_variables == {f"{name}_FILE" for name in SECRET_VALUES} - {"REDIS_URL_FILE"}
    environ = {}
    for name in [*SECRET_VALUES, "HTTP_TIMEOUT"]:
        (tmp_path / name).write_text(SECRET_VALUES.get(name, "3") + "\n")
        environ[f"{name}_FILE"] = str(tmp_path / name)

    settings = Settings.from_env(environ)

    for name in file_variables:
        setting = name.removesuffix("_FILE")
        assert getattr(settings, setting.lower()) == SECRET_VALUES[setting]
    assert settings.redis_url is None and settings.http_timeout == 10


def test_every_secret_is_hidden_from_repr() -> None:
    assert {name for name, setting in SETTINGS.items() if setting.secret} == set(SECRET_VALUES)

    text = repr(Settings.from_env(SECRET_VALUES))

    for name, value in SECRET_VALUES.items():
        assert value not in text
        assert name.lower() not in text


def test_secrets_do_not_appear_in_repr() -> None:
    client_secret = secrets.token_urlsafe(24)
    key = Fernet.generate_key().decode()
    login = f"admin:{secrets.token_urlsafe(12)}"
    redis_password = secrets.token_urlsafe(16)
    settings = Settings.from_env(
        {
            "MIRO_CLIENT_ID": "3458764500000000001",
            "MIRO_CLIENT_SECRET": client_secret,
            "TOKEN_ENCRYPTION_KEYS": key,
            "FLOWER_BASIC_AUTH": login,
            "REDIS_URL": f"redis://:{redis_password}@localhost:6379/0",
        }
    )
    text = repr(settings)
    assert "3458764500000000001" in text  # the repr is real, just without secrets
    for secret in (client_secret, key, login, redis_password):
        assert secret not in text


@pytest.mark.parametrize(
    ("name", "template", "words"),
    [
        ("REDIS_URL", "redis//:{secret}@localhost:6379/0", "is not a Redis URL"),
        ("REDIS_URL", "redis://localhost:{secret}/0", "has a host or port that cannot be read"),
        ("REDIS_URL", "redis://:{secret}@localhost:99999/0", "has a host or port"),
        ("REDIS_URL", "redis://:{secret}@h/0?socket_timeout=x", "Invalid value for 'socket_"),
        ("NOTIFY_WEBHOOK_URL", "hooks.example.com/services/{secret}", "is not a URL"),
        ("MIRO_API_URL", "https://[{secret}", "is not a URL"),
    ],
)
def test_a_malformed_url_is_named_without_the_secret_it_may_hold(
    name: str, template: str, words: str
) -> None:
    secret = secrets.token_urlsafe(16)
    with pytest.raises(SettingsError, match=f"^{name} ") as error:
        Settings.from_env({name: template.format(secret=secret)})
    assert words in str(error.value)
    assert secret not in str(error.value)


def test_a_redis_url_is_kept_as_given() -> None:
    url = "rediss://user:p%40ss@redis.example.com:6380/2?ssl_cert_reqs=required"
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url
