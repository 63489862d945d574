"""The layers, read from the source: ``worker/`` is the domain and never imports ``tasks/``;
Celery is imported by the edges of ``worker/`` named here, and by ``tasks/``."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

#: Celery and its family, as top-level package names.
CELERY = {"celery", "kombu", "billiard", "amqp", "flower"}

#: The modules of ``worker/`` that are Celery's edge, each with why.
CELERY_EDGES = {
    "worker/celery.py": "the app `celery -A worker` finds",
    "worker/broker.py": "the broker's connection and transports",
    "worker/flower.py": "Flower's defaults and host check",
    "worker/forced.py": "queues a forced rotation for the workers",
    "worker/web/app.py": "answers a request the broker could not take",
}

#: The modules that build Celery's app: a module importing one imports Celery.
APP_MODULES = {"worker.celery", "worker.broker"}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or in a function (``from a import b``: both
    ``a`` and ``a.b``, which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _domain() -> list[Path]:
    return [ROOT / "settings.py", *sorted((ROOT / "worker").rglob("*.py"))]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_module_of_worker_or_the_settings_imports_tasks() -> None:
    upward = {
        _name(path): sorted(name for name in imported(path) if name.split(".")[0] == "tasks")
        for path in _domain()
    }

    assert {path: names for path, names in upward.items() if names} == {}


def test_only_the_named_edges_of_worker_import_celery() -> None:
    celery = {
        _name(path): sorted(
            name for name in imported(path) if name.split(".")[0] in CELERY or name in APP_MODULES
        )
        for path in _domain()
        if _name(path) not in CELERY_EDGES
    }

    assert {path: names for path, names in celery.items() if names} == {}


def test_the_named_edges_exist() -> None:
    """A stale entry would let Celery back in under its name."""
    assert [path for path in CELERY_EDGES if not (ROOT / path).is_file()] == []
