"""docs/settings.md, generated from the declarations in ``settings.py``.

``make docs`` (``python -m worker.settings_doc [PATH]``) writes it; a test fails while the
file differs from what this module generates, so the reference never drifts from the code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from settings import SETTINGS, Group, Setting, file_variable

#: Where the reference lives in the repository.
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
#: What regenerates it, as the test that checks it tells a contributor.
REGENERATE = "make docs"

INTRODUCTION = f"""\
# Settings

<!-- Generated from settings.py by `{REGENERATE}`: edit the declarations there, not this file. -->

Every setting comes from the environment and is checked when a process starts: a bad one stops
it with a message that names the variable and what to do. A variable set to the empty string
counts as unset. A setting listed with `<NAME>_FILE` can also be read from the file that
variable names (a container's secret, say), so the secret never passes through the
environment: the file wins over the plain variable, the whitespace around its content is
dropped, and a file that is empty or cannot be read stops the process.
"""


def markdown() -> str:
    """The whole reference: the introduction, then one table per group of settings."""
    sections = [INTRODUCTION]
    for group in Group:
        rows = [_row(name, setting) for name, setting in SETTINGS.items() if setting.group is group]
        if rows:
            sections.append(_table(group, rows))
    return "\n".join(sections)


def _table(group: Group, rows: list[str]) -> str:
    return "\n".join(
        [f"## {group}\n", "| Variable | Default | Meaning |", "|---|---|---|", *rows, ""]
    )


def _row(name: str, setting: Setting) -> str:
    variable = f"`{name}`"
    if setting.file:
        variable += f" or `{file_variable(name)}`"
    default = "unset" if setting.default is None else f"`{setting.default}`"
    return f"| {variable} | {default} | {_cell(setting.doc)} |"


def _cell(text: str) -> str:
    """``text`` inside a table cell, where a bare ``|`` would end the cell."""
    return text.replace("|", "\\|")


def main(argv: Sequence[str] = ()) -> None:
    """Write the reference to ``argv[0]``, or to docs/settings.md."""
    path = Path(argv[0]) if argv else DOC_PATH
    path.write_text(markdown(), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
