"""A person connects and disconnects in a real browser: headless Chromium driven by Playwright,
the real ``python -m worker web``, the real sandbox.

Chromium comes from Debian (``apt-get install chromium``; ``make test`` installs it where it
can), never from ``playwright install``. Without it the test is skipped, except under CI,
where a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.test_web import LOGIN, board_answers, sandbox_tokens, served_web
from worker.credential import CredentialId
from worker.sandbox import Sandbox
from worker.vault import Vault

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            "chromium is not installed and CI must run the browser test: `make test` installs "
            "it as root (apt-get install chromium)"
        )
    pytest.skip("chromium is not installed (apt-get install chromium): browser test skipped")


def test_a_user_connects_and_disconnects_in_a_browser(
    chromium: str, env: dict[str, str], tmp_path: Path, vault: Vault, sandbox: Sandbox
) -> None:
    login = {"WEB_BASIC_AUTH": ":".join(LOGIN)}
    with (
        served_web(env, tmp_path / "logs", **login) as url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            http_credentials={"username": LOGIN[0], "password": LOGIN[1]},
        )
        page = browser.new_page()
        page.goto(url)

        page.get_by_role("button", name="Connect to Miro").click()

        expect(page.get_by_role("heading")).to_have_text("Connected to Miro")
        assert page.url.startswith(f"{url}/oauth/callback?")
        credential_id = CredentialId.parse(page.locator("#credential").inner_text())
        assert list(vault.store.ids()) == [credential_id]
        assert board_answers(sandbox, vault, credential_id) == 200
        shown = page.content()

        page.goto(url)
        row = page.get_by_role("row").filter(has_text=str(credential_id))
        expect(row).to_contain_text("active")
        shown += page.content()
        row.get_by_role("button", name="Disconnect").click()

        expect(page.get_by_role("heading")).to_have_text(f"Disconnected {credential_id}")
        assert list(vault.store.ids()) == []
        grant = sandbox.grant(credential_id.team_id, credential_id.user_id)
        assert grant is not None and grant["revoked"]
        for token in sandbox_tokens(sandbox):
            assert token not in shown
        browser.close()
