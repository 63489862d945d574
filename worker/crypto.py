"""Encryption of tokens at rest with Fernet, several keys at once for rotation.

Records keep the raw Fernet bytes (not their base64 text): a million credentials save
~67 MB that way. The first key encrypts; every key decrypts, so a new key can be rolled
out first and the old one removed once ``python -m worker rotate-key`` has run.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from settings import Settings, SettingsError
from worker.datadir import read_or_create

log = logging.getLogger(__name__)

KEY_FILE_NAME = "encryption.key"


class UndecryptableError(Exception):
    """No configured key decrypts this ciphertext (a wrong or missing key, or tampering)."""


def _parse_keys(text: str, source: str) -> list[str]:
    keys = [part.strip() for part in text.split(",") if part.strip()]
    if not keys:
        raise SettingsError(f"{source} holds no key; generate one with `python -m worker gen-key`")
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, binascii.Error):
            raise SettingsError(
                f"{source}: key {position} of {len(keys)} is not a Fernet key (32 url-safe "
                "base64-encoded bytes); generate one with `python -m worker gen-key`"
            ) from None
    return keys


def _generated_key(data_dir: Path) -> str:
    """Read the key generated on an earlier start, or generate it now, readable by us only.

    The warning comes once, from the process that creates the key: repeated on every command
    after it, it would teach operators to skip warnings (``doctor`` keeps reporting the key).
    """
    path = data_dir / KEY_FILE_NAME
    key, created = read_or_create(path, Fernet.generate_key().decode())
    if created:
        log.warning(
            "TOKEN_ENCRYPTION_KEYS is not set: GENERATED a new encryption key in %s. "
            "Back it up: without it every stored token is lost. In production, set "
            "TOKEN_ENCRYPTION_KEYS (or TOKEN_ENCRYPTION_KEYS_FILE) instead.",
            path,
        )
    else:
        log.info("TOKEN_ENCRYPTION_KEYS is not set: using the generated key in %s", path)
    return key


class TokenCipher:
    """Encrypts and decrypts token plaintext to raw Fernet bytes."""

    def __init__(self, keys: list[str]) -> None:
        fernets = [Fernet(key) for key in keys]
        self._fernet = MultiFernet(fernets)
        self._primary = fernets[0]
        self.key_count = len(keys)

    @classmethod
    def from_text(cls, text: str, source: str = "TOKEN_ENCRYPTION_KEYS") -> TokenCipher:
        return cls(_parse_keys(text, source))

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenCipher:
        if settings.token_encryption_keys:
            return cls.from_text(settings.token_encryption_keys)
        path = settings.data_dir / KEY_FILE_NAME
        return cls.from_text(_generated_key(settings.data_dir), str(path))

    def encrypt(self, plaintext: bytes) -> bytes:
        """Raw Fernet bytes of ``plaintext`` under the first key.

        Fernet itself, not a hand-made writer of its format: one was measured on the import
        path (bench/: seeding) and saved about 8 of the ~65 µs a credential costs there, not
        worth owning crypto code for.
        """
        return base64.urlsafe_b64decode(self._primary.encrypt(plaintext))

    def decrypt(self, ciphertext: bytes) -> bytes:
        try:
            return self._fernet.decrypt(base64.urlsafe_b64encode(ciphertext))
        except InvalidToken:
            raise UndecryptableError(
                "no key in TOKEN_ENCRYPTION_KEYS decrypts this record; add the key it was "
                "written with"
            ) from None

    def is_primary(self, ciphertext: bytes) -> bool:
        """Whether the first key already decrypts this ciphertext (no re-encryption needed)."""
        try:
            self._primary.decrypt(base64.urlsafe_b64encode(ciphertext))
        except InvalidToken:
            return False
        return True

    def reencrypt(self, ciphertext: bytes) -> bytes:
        """The same plaintext under the first key, keeping its original timestamp."""
        try:
            token = self._fernet.rotate(base64.urlsafe_b64encode(ciphertext))
        except InvalidToken:
            raise UndecryptableError("no configured key decrypts this record") from None
        return base64.urlsafe_b64decode(token)


def generate_key() -> str:
    return Fernet.generate_key().decode()
