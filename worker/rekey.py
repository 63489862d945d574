"""Key rotation: re-encrypt every record under the first key of TOKEN_ENCRYPTION_KEYS.

Put the new key first (keep the old ones after it), restart the service, then run
``python -m worker rotate-key``. Each record is replaced only if it is still byte for byte
what was read (``scripts/replace_if_equal.lua``), so a rotation that commits meanwhile is
never overwritten; the record is simply read again. A record already under the first key is
skipped, which makes the command resumable: interrupt it, run it again, it picks up where
it was. When it reports nothing left under an old key, that key can be removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.credential import CredentialId
from worker.crypto import UndecryptableError
from worker.record import CorruptRecordError, RawRecord
from worker.store import CredentialStore

log = logging.getLogger(__name__)

#: A record that keeps changing under us is left for the next run after this many tries.
MAX_ATTEMPTS = 5


@dataclass
class RekeyReport:
    reencrypted: int = 0
    already_current: int = 0
    undecryptable: int = 0
    corrupt: int = 0
    busy: int = 0

    @property
    def old_keys_removable(self) -> bool:
        """Whether no record still needs a key other than the first one."""
        return not (self.undecryptable or self.corrupt or self.busy)


def rekey_one(store: CredentialStore, credential_id: CredentialId) -> str:
    """Re-encrypt one record; returns which :class:`RekeyReport` field it counts in."""
    for _ in range(MAX_ATTEMPTS):
        data = store.raw(credential_id)
        if data is None:
            return "already_current"  # deleted meanwhile: nothing left to re-encrypt
        try:
            raw = RawRecord.parse(data)
        except CorruptRecordError:
            return "corrupt"
        if store.cipher.is_primary(raw.ciphertext):
            return "already_current"
        try:
            ciphertext = store.cipher.reencrypt(raw.ciphertext)
        except UndecryptableError:
            return "undecryptable"
        if store.replace_if_equal(credential_id, data, raw.with_ciphertext(ciphertext)):
            return "reencrypted"
    return "busy"


def rekey_all(
    store: CredentialStore,
    ids: Iterable[CredentialId],
    on_progress: Callable[[], object] = lambda: None,
) -> RekeyReport:
    report = RekeyReport()
    for credential_id in ids:
        outcome = rekey_one(store, credential_id)
        setattr(report, outcome, getattr(report, outcome) + 1)
        if outcome in ("undecryptable", "corrupt", "busy"):
            log.warning("rotate-key: %s is %s", credential_id, outcome)
        on_progress()
    return report
