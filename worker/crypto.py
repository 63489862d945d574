"""Encryption of tokens at rest with Fernet, several keys at once for rotation.

Records keep the raw Fernet bytes (not their base64 text): a million credentials save
~67 MB that way. The first key encrypts; every key decrypts, so a new key can be rolled
out first and the old one removed once ``python -m worker rotate-key`` has run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from settings import Settings, SettingsError

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


class _FernetWriter:
    """Writes raw Fernet tokens (https://github.com/fernet/spec) straight from the primitives.

    ``Fernet.encrypt`` builds a padder, an HMAC object and an AES-CBC context for every token
    (the context alone costs more than the encryption) and returns base64 that records then
    decode again: most of its cost, which an import of a million users pays a million times.
    The bytes are Fernet's (version 0x80, timestamp, IV, AES-128-CBC of the PKCS7-padded
    plaintext, HMAC-SHA256 over all of it), so ``Fernet`` decrypts them.
    """

    _VERSION = b"\x80"

    def __init__(self, key: str) -> None:
        raw = base64.urlsafe_b64decode(key)
        self._mac = hmac.new(raw[:16], digestmod=hashlib.sha256)
        self._aes = algorithms.AES(raw[16:])

    def encrypt_many(self, plaintexts: Sequence[bytes]) -> list[bytes]:
        """One token per plaintext, each under its own random IV, through one AES-CBC context.

        CBC encrypts a block as E(block XOR the previous ciphertext block); feeding a token's
        first block XORed with its IV and with the stream's last ciphertext block therefore
        yields E(block XOR IV): exactly that token's CBC encryption under its own IV.
        """
        chain = bytes(16)
        encryptor = Cipher(self._aes, modes.CBC(chain)).encryptor()
        prefix = self._VERSION + struct.pack(">Q", int(time.time()))
        ivs = os.urandom(16 * len(plaintexts))
        tokens = []
        for start, plaintext in zip(range(0, len(ivs), 16), plaintexts, strict=True):
            iv = ivs[start : start + 16]
            pad = 16 - len(plaintext) % 16
            padded = plaintext + bytes((pad,)) * pad
            first = _xor(padded[:16], iv, chain)
            body = encryptor.update(first + padded[16:])
            chain = body[-16:]
            signed = prefix + iv + body
            mac = self._mac.copy()
            mac.update(signed)
            tokens.append(signed + mac.digest())
        return tokens


def _xor(*blocks: bytes) -> bytes:
    """The XOR of 16-byte blocks."""
    value = 0
    for block in blocks:
        value ^= int.from_bytes(block, "big")
    return value.to_bytes(16, "big")


def _generated_key(data_dir: Path) -> str:
    """Read the key generated on an earlier start, or generate it now, readable by us only."""
    path = data_dir / KEY_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process generated it first
            return path.read_text().strip()
        with os.fdopen(descriptor, "wb") as file:
            file.write(key + b"\n")
        log.warning(
            "TOKEN_ENCRYPTION_KEYS is not set: GENERATED a new encryption key in %s. "
            "Back it up: without it every stored token is lost. In production, set "
            "TOKEN_ENCRYPTION_KEYS (or TOKEN_ENCRYPTION_KEYS_FILE) instead.",
            path,
        )
    else:
        log.warning("TOKEN_ENCRYPTION_KEYS is not set: using the generated key in %s", path)
    return path.read_text().strip()


class TokenCipher:
    """Encrypts and decrypts token plaintext to raw Fernet bytes."""

    def __init__(self, keys: list[str]) -> None:
        fernets = [Fernet(key) for key in keys]
        self._fernet = MultiFernet(fernets)
        self._primary = fernets[0]
        self._writer = _FernetWriter(keys[0])
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
        """Raw Fernet bytes of ``plaintext`` under the first key."""
        return self._writer.encrypt_many([plaintext])[0]

    def encrypt_many(self, plaintexts: Sequence[bytes]) -> list[bytes]:
        """:meth:`encrypt` of each plaintext; a batch costs a third less than one by one."""
        return self._writer.encrypt_many(plaintexts)

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
