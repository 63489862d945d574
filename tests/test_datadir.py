"""DATA_DIR: the directory 0700 and every file in it 0600, under any umask."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from settings import Settings
from worker.crypto import TokenCipher
from worker.journal import Journal, JournalEntry
from worker.web.state import secret_key


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Umask 000, as some container images and service managers set it."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _open_to_others(data_dir: Path) -> dict[str, str]:
    """What in DATA_DIR (itself included) is not 0700 for a directory or 0600 for a file."""
    found = {}
    for path in [data_dir, *data_dir.rglob("*")]:
        status = path.lstat()
        mode = stat.S_IMODE(status.st_mode)
        if mode != (0o700 if stat.S_ISDIR(status.st_mode) else 0o600):
            found[str(path.relative_to(data_dir))] = oct(mode)
    return found


def test_the_keys_and_the_journal_are_private_under_umask_000(
    tmp_path: Path, loose_umask: None
) -> None:
    data_dir = tmp_path / "var"
    settings = Settings.from_env({"DATA_DIR": str(data_dir)})

    TokenCipher.from_settings(settings)
    secret_key(settings)
    journal = Journal(data_dir)
    journal.spill(JournalEntry("1:2", "1", b"record", None))

    names = {path.name for path in data_dir.iterdir()}
    assert {"encryption.key", "web-secret.key", "journal.jsonl", "journal.jsonl.lock"} <= names
    assert _open_to_others(data_dir) == {}


def test_an_existing_data_dir_open_to_others_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    caplog.set_level(logging.WARNING)

    TokenCipher.from_settings(Settings.from_env({"DATA_DIR": str(data_dir)}))

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert "was open to other users (mode 0755): made it 0700" in caplog.text
