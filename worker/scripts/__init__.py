"""The Lua scripts that make multi-key changes atomic, kept beside the code that runs them."""

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    return files(__package__).joinpath(f"{name}.lua").read_text()
