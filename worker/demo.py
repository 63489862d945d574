"""The demo's own place, DATA_DIR/demo, and how a command run beside the demo finds it.

The demo (``python -m worker dev`` with no Miro app configured) keeps its Redis data, its
generated keys and its settings in a directory of its own, which it empties when it starts:
a sandbox's users die with the sandbox. A file in it, ``demo.lock``, marks the directory as
the demo's and is locked while a demo runs; the demo empties no directory without it, and
nothing outside it. ``python -m worker --demo COMMAND`` reads the settings the running demo
wrote there, so the command talks to the demo's Redis and sandbox, whatever the shell's
environment configures.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from settings import Settings, configuring_names

DIRECTORY_NAME = "demo"
LOCK_NAME = "demo.lock"
ENVIRONMENT_NAME = "environment.json"


class DemoError(Exception):
    """The demo cannot start, or cannot be reached; the message says why and what to do."""


def demo_dir(data_dir: Path) -> Path:
    """Where the demo keeps everything: a directory of its own, in DATA_DIR."""
    return data_dir / DIRECTORY_NAME


def without_configuration(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without a variable that configures the service: the demo brings its own."""
    names = configuring_names()
    return {name: value for name, value in environ.items() if name not in names}


@contextmanager
def held(directory: Path) -> Iterator[None]:
    """Hold ``directory`` for a demo, emptied of an earlier run's files, until the demo ends.

    Raises:
        DemoError: a demo already runs from it, or it holds files no demo made.
    """
    lock = directory / LOCK_NAME
    if directory.is_dir() and not lock.exists() and any(directory.iterdir()):
        raise DemoError(
            f"{directory} holds files the demo did not make, and the demo empties that "
            "directory when it starts: move them away, or set DATA_DIR to another directory"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(
                f"a demo already runs from {directory}: use it (add --demo to a command), or "
                "stop it first (Ctrl-C in its terminal)"
            ) from None
        try:
            yield
        finally:
            (directory / ENVIRONMENT_NAME).unlink(missing_ok=True)  # no demo to reach now
    finally:
        os.close(descriptor)


def empty(directory: Path) -> None:
    """Delete what an earlier demo left in its ``directory`` (held), the lock aside."""
    for path in directory.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_private(path: Path, text: str) -> str:
    """Write a new file that only we can read; its path, as a ``*_FILE`` setting wants it."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text + "\n")
    return str(path)


def write_environment(directory: Path, variables: Mapping[str, str]) -> None:
    """Leave the demo's settings for the commands run beside it."""
    write_private(directory / ENVIRONMENT_NAME, json.dumps(dict(variables), indent=2))


def use_running_demo(environ: MutableMapping[str, str]) -> None:
    """Point ``environ`` at the running demo: its settings replace every configured one.

    Raises:
        DemoError: no demo runs from DATA_DIR/demo, or it has not written its settings yet.
    """
    # DATA_DIR alone of the settings: the others configure the store the demo stays out of.
    data_dir = {"DATA_DIR": environ["DATA_DIR"]} if "DATA_DIR" in environ else {}
    directory = demo_dir(Settings.from_env(data_dir).data_dir)
    if not _is_held(directory / LOCK_NAME):
        raise DemoError(
            f"no demo runs from {directory}: start one with `make run` (or `python -m worker "
            "dev`), with the same DATA_DIR"
        )
    try:
        variables = json.loads((directory / ENVIRONMENT_NAME).read_text())
    except FileNotFoundError:
        raise DemoError("the demo is still starting; try again in a few seconds") from None
    for name in set(environ) - set(without_configuration(environ)):
        del environ[name]
    environ.update(variables)


def _is_held(lock: Path) -> bool:
    try:
        descriptor = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False
