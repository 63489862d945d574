"""The short chaos soak, every run: under a minute of kills, restarts and Miro faults, each kind
at least once."""

from __future__ import annotations

from pathlib import Path

import pytest

from soak.chaos import ACTIONS
from soak.runner import SoakConfig, run

pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing(tmp_path: Path) -> None:
    verdict = run(SoakConfig(credentials=150, chaos_seconds=30, settle_seconds=60), tmp_path)
    print(verdict.table())
    assert verdict.ok, verdict.table()
    assert set(ACTIONS) <= set(verdict.chaos), "every kind of chaos ran"
    assert verdict.rotations > 500
