"""The Lua scripts that make multi-key changes atomic, kept beside the code that runs them.

A line ``-- include: NAME`` in a script is replaced by the script ``NAME.lua``: Redis runs
one self-contained source, and the pieces several scripts share are written once.
"""

import re
from functools import cache
from importlib.resources import files

_INCLUDE = re.compile(r"^-- include: (\w+)$", re.MULTILINE)


@cache
def source(name: str) -> str:
    text = files(__package__).joinpath(f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda line: source(line.group(1)), text)
