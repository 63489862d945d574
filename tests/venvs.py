"""Fresh virtualenvs made from the project's locks, as a deploy or an integrator makes them.

Nothing of the test run's own virtualenv is seen there, and a lock's packages are checked
against their hashes: pip then refuses a lock that misses a dependency, so a package that
only the dev requirements bring in cannot make a test pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

#: Variables of the test run that would let a fresh virtualenv see other packages.
LEAKING_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def fresh_virtualenv(path: Path, *requirements: Path) -> Path:
    """A new virtualenv at ``path`` with each requirements file installed; returns its ``bin``."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    for requirement in requirements:
        install = subprocess.run(
            [str(path / "bin" / "pip"), "install", "--quiet", "-r", str(requirement)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert install.returncode == 0, install.stderr[-3000:]
    return path / "bin"


def isolated_environment() -> dict[str, str]:
    """This process's environment, without what would show a fresh virtualenv other packages."""
    return {name: value for name, value in os.environ.items() if name not in LEAKING_VARIABLES}
