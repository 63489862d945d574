"""Token encryption: several keys, clear errors, and a generated key that is kept private."""

from __future__ import annotations

import base64
import logging
import secrets
import stat
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from settings import Settings, SettingsError
from worker.crypto import KEY_FILE_NAME, TokenCipher, UndecryptableError, generate_key


def _key() -> str:
    return Fernet.generate_key().decode()


def _plaintext() -> bytes:
    return secrets.token_urlsafe(60).encode()


def test_round_trip_gives_back_the_plaintext_and_hides_it() -> None:
    cipher = TokenCipher.from_text(_key())
    plaintext = _plaintext()
    ciphertext = cipher.encrypt(plaintext)
    assert plaintext not in ciphertext
    assert cipher.decrypt(ciphertext) == plaintext


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    old, new = _key(), _key()
    under_old = TokenCipher.from_text(old).encrypt(b"old pair")
    both = TokenCipher.from_text(f"{new}, {old}")

    assert both.key_count == 2
    assert both.decrypt(under_old) == b"old pair"
    under_both = both.encrypt(b"new pair")
    assert TokenCipher.from_text(new).decrypt(under_both) == b"new pair"
    with pytest.raises(UndecryptableError):
        TokenCipher.from_text(old).decrypt(under_both)


def test_a_bad_key_entry_names_its_position_but_not_its_value() -> None:
    bad = secrets.token_urlsafe(20)
    with pytest.raises(SettingsError, match="TOKEN_ENCRYPTION_KEYS: key 2 of 3") as error:
        TokenCipher.from_text(f"{_key()},{bad},{_key()}")
    assert bad not in str(error.value)


def test_an_empty_key_list_is_refused() -> None:
    with pytest.raises(SettingsError, match="holds no key"):
        TokenCipher.from_text(" , ")


def test_a_wrong_key_raises_undecryptable_naming_the_setting() -> None:
    ciphertext = TokenCipher.from_text(_key()).encrypt(b"pair")
    with pytest.raises(UndecryptableError, match="TOKEN_ENCRYPTION_KEYS"):
        TokenCipher.from_text(_key()).decrypt(ciphertext)


def test_tampered_ciphertext_is_undecryptable() -> None:
    cipher = TokenCipher.from_text(_key())
    ciphertext = bytearray(cipher.encrypt(b"pair"))
    ciphertext[-40] ^= 1
    with pytest.raises(UndecryptableError):
        cipher.decrypt(bytes(ciphertext))


def test_without_keys_a_private_key_file_is_generated_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "var"
    settings = Settings.from_env({"DATA_DIR": str(data_dir)})
    caplog.set_level(logging.WARNING, logger="worker.crypto")

    first = TokenCipher.from_settings(settings)

    key_file = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    Fernet(key_file.read_text().strip())  # a valid key
    assert "GENERATED a new encryption key" in caplog.text
    assert str(key_file) in caplog.text
    ciphertext = first.encrypt(b"pair")

    caplog.clear()
    caplog.set_level(logging.INFO, logger="worker.crypto")
    second = TokenCipher.from_settings(settings)

    assert second.decrypt(ciphertext) == b"pair"
    # Announced once, when created; after that, for -v only.
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert f"using the generated key in {key_file}" in record.getMessage()


def test_configured_keys_create_no_key_file(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "TOKEN_ENCRYPTION_KEYS": _key()})
    TokenCipher.from_settings(settings).encrypt(b"pair")
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_a_broken_generated_key_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_text("not-a-key\n")
    with pytest.raises(SettingsError, match=KEY_FILE_NAME):
        TokenCipher.from_settings(Settings.from_env({"DATA_DIR": str(tmp_path)}))


def test_reencrypt_moves_a_record_to_the_first_key_keeping_its_timestamp() -> None:
    old, new = _key(), _key()
    ciphertext = TokenCipher.from_text(old).encrypt(b"pair")
    cipher = TokenCipher.from_text(f"{new},{old}")
    assert not cipher.is_primary(ciphertext)

    moved = cipher.reencrypt(ciphertext)

    assert cipher.is_primary(moved)
    assert TokenCipher.from_text(new).decrypt(moved) == b"pair"
    assert moved[1:9] == ciphertext[1:9]  # Fernet's timestamp field


def test_is_primary_is_true_for_what_the_cipher_wrote() -> None:
    cipher = TokenCipher.from_text(f"{_key()},{_key()}")
    assert cipher.is_primary(cipher.encrypt(b"pair"))


def test_reencrypt_under_no_known_key_is_undecryptable() -> None:
    ciphertext = TokenCipher.from_text(_key()).encrypt(b"pair")
    with pytest.raises(UndecryptableError):
        TokenCipher.from_text(_key()).reencrypt(ciphertext)


def test_generate_key_returns_distinct_fernet_keys() -> None:
    first, second = generate_key(), generate_key()
    assert first != second
    assert TokenCipher.from_text(first).key_count == 1
    Fernet(second)


def test_what_the_cipher_writes_is_a_fernet_token_of_now() -> None:
    key = _key()
    plaintext = _plaintext()
    before = int(time.time())

    token = base64.urlsafe_b64encode(TokenCipher.from_text(key).encrypt(plaintext))

    assert Fernet(key).decrypt(token) == plaintext  # the format, padding and HMAC are Fernet's
    assert before <= Fernet(key).extract_timestamp(token) <= time.time()
    assert TokenCipher.from_text(key).encrypt(plaintext) != TokenCipher.from_text(key).encrypt(
        plaintext
    )  # a fresh IV each time
