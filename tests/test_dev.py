"""``make run`` (``python -m worker dev``): everything starts, users are connected, all stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, free_port, run_cli, wait_for
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.ConnectionError:
        return False


def test_dev_starts_redis_the_sandbox_worker_beat_flower_and_web(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "var"), "EMBEDDED_REDIS_PORT": str(free_port())}
    for name in ("REDIS_URL", "MIRO_CLIENT_ID", "TOKEN_ENCRYPTION_KEYS"):
        assert name not in os.environ  # the newcomer's machine: nothing configured
    dev = subprocess.Popen(
        [sys.executable, "-m", "worker", "dev"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for url in ("http://127.0.0.1:5000/healthz", "http://127.0.0.1:5555/healthcheck"):
            wait_for(lambda url=url: _answers(url), timeout=60, message=url)
        sandbox_env = {**env, "MIRO_CLIENT_ID": "x", "MIRO_CLIENT_SECRET": "x",
                       "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/oauth/callback"}  # fmt: skip
        status: dict[str, Any] = json.loads(run_cli(sandbox_env, "status", "--json").stdout)
        assert status["by_state"] == {"active": 5}
        assert (tmp_path / "var" / "encryption.key").stat().st_mode & 0o777 == 0o600
    finally:
        dev.send_signal(signal.SIGTERM)
        output = dev.communicate(timeout=90)[0].decode(errors="replace")
        RedisServer(tmp_path / "var", int(env["EMBEDDED_REDIS_PORT"])).stop()
    assert dev.returncode == 0, output[-3000:]
    assert "sandbox" in output and "GENERATED a new encryption key" in output
