"""requirements-sdk.txt: Miro's SDK next to the vault, installed as an integrator installs it.

A fresh virtualenv gets requirements-sdk.txt and the test runner (at requirements-dev.txt's
pins and hashes), and nothing else; tests/test_sdk.py runs there, with the tests of the
modules that the SDK's urllib3 1.26 reaches: worker/miro.py's own pool, and worker/client.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.venvs import fresh_virtualenv, isolated_environment

pytestmark = pytest.mark.slow

#: The tests that run on the SDK's urllib3.
SDK_TESTS = ("tests/test_sdk.py", "tests/test_miro.py", "tests/test_client.py")
#: The test runner and all it needs that requirements-sdk.txt lacks: pip names any missing.
TEST_TOOLS = ("pytest", "iniconfig", "pluggy", "pygments", "hypothesis", "sortedcontainers")


def locked(lock: Path, names: Iterable[str]) -> str:
    """The entries of ``names`` in ``lock``, each a pin and its hashes."""
    entries = re.split(r"\n(?=\S)", lock.read_text())
    return "\n".join(entry for entry in entries if entry.partition("==")[0] in names) + "\n"


@pytest.fixture(scope="module")
def sdk_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv's ``bin`` with requirements-sdk.txt and the test runner in it."""
    directory = tmp_path_factory.mktemp("sdk")
    tools = directory / "test-tools.txt"
    tools.write_text(locked(ROOT / "requirements-dev.txt", TEST_TOOLS))
    return fresh_virtualenv(directory / "venv", ROOT / "requirements-sdk.txt", tools)


def test_the_sdk_lock_holds_urllib3_1_26(sdk_bin: Path) -> None:
    version = subprocess.run(
        [str(sdk_bin / "python"), "-c", "import urllib3; print(urllib3.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert version.startswith("1.26."), (
        f"requirements-sdk.txt now locks urllib3 {version}: nothing tests worker/miro.py on "
        "urllib3 1.26 any more; test it elsewhere or narrow requirements.in's range"
    )


def test_the_sdk_tests_pass_on_what_requirements_sdk_txt_installs(sdk_bin: Path) -> None:
    run = subprocess.run(
        [str(sdk_bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SDK_TESTS],
        cwd=ROOT,
        env=isolated_environment(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-3000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "skipped" not in summary, summary


def test_without_the_sdk_worker_sdk_names_the_lock_to_install() -> None:
    hide_the_sdk = "import sys; sys.modules['miro_api'] = None; import worker.sdk"
    result = subprocess.run(
        [sys.executable, "-c", hide_the_sdk],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "pip install -r requirements-sdk.txt" in result.stderr.strip().splitlines()[-1]
