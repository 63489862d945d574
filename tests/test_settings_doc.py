"""docs/settings.md: generated from the settings' declarations, and kept current."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from settings import SETTINGS
from tests.conftest import run_module
from worker.settings_doc import DOC_PATH, REGENERATE, markdown


def test_docs_settings_md_is_what_the_command_writes(tmp_path: Path) -> None:
    written = tmp_path / "settings.md"

    result = run_module({}, "worker.settings_doc", str(written))

    assert result.returncode == 0, result.stderr
    committed = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    generated = written.read_text(encoding="utf-8")
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm=""
        )
        pytest.fail(
            f"docs/settings.md is out of date: run `{REGENERATE}` and commit it\n"
            + "\n".join(list(diff)[:40])
        )


def test_each_variable_shows_its_default_its_file_variable_and_its_doc() -> None:
    rows = {line.split(" |", 1)[0]: line for line in markdown().splitlines() if "|" in line}

    for name, setting in SETTINGS.items():
        variable = f"| `{name}` or `{name}_FILE`" if setting.file else f"| `{name}`"
        default = "unset" if setting.default is None else f"`{setting.default}`"
        cell = setting.doc.replace("|", "\\|")  # a bare bar would end the cell
        assert rows[variable] == f"{variable} | {default} | {cell} |"
