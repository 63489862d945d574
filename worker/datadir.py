"""DATA_DIR, readable by the service's user only, whatever the umask.

It holds the generated encryption key and signing key, the embedded Redis's password and
data, the rescue journal, beat's schedule and Flower's history. The directory is 0700 and
every file the service writes there 0600: an umask of 000 (some container images, some
service managers) would otherwise give every local user the keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
#: The umask of processes that write into DATA_DIR through libraries which take it as it is.
PRIVATE_UMASK = 0o077


def private_directory(path: Path) -> Path:
    """Create ``path`` 0700, or take group and other access away from an existing one.

    An existing directory open to others (made by an earlier version, or under a loose umask)
    is tightened with a warning rather than refused: it is ours, and so is what it holds.
    """
    try:
        path.mkdir(mode=DIRECTORY_MODE, parents=True)
    except FileExistsError:
        _tighten(path)
    return path


def _tighten(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & ~DIRECTORY_MODE:
        return
    try:
        path.chmod(DIRECTORY_MODE)
    except PermissionError:
        log.warning(
            "DATA_DIR %s is open to other users (mode %04o) and this process, not its owner, "
            "cannot change that: run `chmod 700 %s` as its owner",
            path,
            mode,
            path,
        )
        return
    log.warning("DATA_DIR %s was open to other users (mode %04o): made it 0700", path, mode)


def private_process(data_dir: Path) -> Path:
    """Make DATA_DIR private, and every file this process creates 0600 (umask 077).

    For the service's own processes (the Celery worker, beat, Flower), whose libraries write
    into DATA_DIR with the umask's mode: beat's schedule, Flower's history. An integrator's
    process using the vault keeps its umask.
    """
    os.umask(PRIVATE_UMASK)
    return private_directory(data_dir)


def _create_private_file(path: Path, content: str) -> bool:
    """Write a 0600 file unless it exists, atomically: a reader sees all of it or nothing.

    Written aside and hard-linked into place, so when two processes race, the first link wins
    and both read the same content.

    Returns:
        Whether this call created the file (False: another process had).
    """
    aside = _written_aside(path, content)
    try:
        os.link(aside, path)
    except FileExistsError:
        return False
    finally:
        aside.unlink()
    return True


def write_private_file(path: Path, content: str) -> None:
    """Write or replace a 0600 file atomically: a reader sees the old content or the new."""
    _written_aside(path, content).replace(path)


def _written_aside(path: Path, content: str) -> Path:
    private_directory(path.parent)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    with os.fdopen(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "w") as file:
        file.write(content + "\n")
    return aside


def read_or_create(path: Path, make: str) -> tuple[str, bool]:
    """The content of the private file ``path``, written with ``make`` first if it is absent.

    Returns:
        The content, and whether this call created the file.
    """
    created = not path.exists() and _create_private_file(path, make)
    return path.read_text().strip(), created
