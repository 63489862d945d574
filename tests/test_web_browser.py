"""The console in a real browser: headless Chromium driven by Playwright, the real
``python -m worker web``, a real Celery worker, the real sandbox.

Chromium comes from Debian (``apt-get install chromium``; ``make test`` installs it where it
can), never from ``playwright install``. Without it the tests are skipped, except under CI,
where a skipped browser test would hide a broken page.

``CONSOLE_SCREENSHOTS=1`` makes the console test write ``docs/console-laptop.png`` and
``docs/console-phone.png``, the README's pictures; other runs leave them alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Locator, Page, expect, sync_playwright

from soak.processes import ServiceProcesses
from tests.conftest import ROOT
from tests.test_web import LOGIN, board_answers, sandbox_tokens, served_web, worker_process
from worker.credential import CredentialId
from worker.listing import PAGE_SIZE
from worker.sandbox import Sandbox
from worker.vault import Vault

__all__ = ["worker_process"]  # a fixture of test_web's, used here

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TEAMS = ("3074457358607431473", "3074457362198745012", "3074457349912873366")
#: Seconds the console waits between two refreshes, plus room for a worker's rotation.
SELF_UPDATE_TIMEOUT_MS = 20_000
SCREENSHOTS = {"laptop": (1280, 860), "phone": (390, 844)}


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


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            http_credentials={"username": LOGIN[0], "password": LOGIN[1]},
            viewport={"width": 1280, "height": 860},
        )
        yield context
        context.close()


def _row(page: Page, credential_id: CredentialId | str) -> Locator:
    return page.locator(f'tr[data-id="{credential_id}"]')


def test_a_user_connects_and_the_operator_disconnects_them(
    env: dict[str, str], tmp_path: Path, vault: Vault, sandbox: Sandbox, browser: BrowserContext
) -> None:
    login = {"WEB_BASIC_AUTH": ":".join(LOGIN)}
    with served_web(env, tmp_path / "logs", **login) as url:
        page = browser.new_page()
        page.goto(url)

        page.get_by_role("button", name="Connect to Miro").click()

        expect(page.get_by_role("heading")).to_have_text("Connected to Miro")
        assert page.url.startswith(f"{url}/oauth/callback?")
        credential_id = CredentialId.parse(page.locator("#credential").inner_text())
        assert list(vault.store.ids()) == [credential_id]
        assert board_answers(sandbox, vault, credential_id) == 200
        shown = page.content()

        page.get_by_role("link", name="Back to the console").click()
        row = page.locator(f'tr[data-id="{credential_id}"]')
        expect(row).to_contain_text("active")
        shown += page.content()
        row.locator("summary", has_text="Disconnect").click()
        row.get_by_role("button", name="Yes, disconnect").click()

        expect(page.locator("#notices")).to_contain_text(f"Disconnected {credential_id}")
        expect(row).to_have_count(0)
        assert list(vault.store.ids()) == []
        grant = sandbox.grant(credential_id.team_id, credential_id.user_id)
        assert grant is not None and grant["revoked"]
        for token in sandbox_tokens(sandbox):
            assert token not in shown


def _stored_with_troubles(vault: Vault, sandbox: Sandbox) -> list[CredentialId]:
    """Credentials of three teams, one page and more, as a store in use looks.

    One user uninstalled the app (``needs_reauth``, found out by a forced rotation), one
    refresh met a Miro error (retried later), a few were rotated already.
    """
    ids = [
        credential.id
        for index, team in enumerate(TEAMS)
        for credential in vault.import_many(sandbox.create_grants(20 + 3 * index, team))
    ]
    for credential_id in ids[5:8]:
        assert vault.rotate_now(credential_id).outcome == "rotated"
    gone = ids[10]
    sandbox.revoke_grant(gone.team_id, gone.user_id)
    assert vault.rotate_now(gone).outcome == "needs_reauth"
    sandbox.set_faults(error_rate=1.0)
    assert vault.rotate_now(ids[20]).outcome == "rescheduled"
    sandbox.set_faults(error_rate=0.0)
    return ids


def test_the_operator_watches_searches_pages_and_rotates_in_the_console(
    env: dict[str, str],
    tmp_path: Path,
    vault: Vault,
    sandbox: Sandbox,
    browser: BrowserContext,
    worker_process: ServiceProcesses,
) -> None:
    ids = _stored_with_troubles(vault, sandbox)
    login = {"WEB_BASIC_AUTH": ":".join(LOGIN)}
    with served_web(env, tmp_path / "logs", **login) as url:
        page = browser.new_page()
        page.goto(url)

        figures = page.locator("#summary")
        expect(figures).to_contain_text(f"{len(ids)}stored")
        expect(figures).to_contain_text("1needs reauth")
        rows = page.locator("tbody tr[data-id]")
        expect(rows).to_have_count(PAGE_SIZE)
        expect(rows.first.locator("time").first).not_to_contain_text("UTC")  # local time
        _fits_a_phone(page)
        if os.environ.get("CONSOLE_SCREENSHOTS"):
            _screenshots(page)

        page.get_by_role("link", name="Needs attention").click()
        expect(rows).to_have_count(2)
        expect(_row(page, ids[10])).to_contain_text("needs reauth")
        expect(_row(page, ids[20])).to_contain_text("500")

        page.get_by_role("searchbox").fill(TEAMS[1])
        page.get_by_role("button", name="Search").click()
        expect(rows).to_have_count(23)
        page.get_by_role("searchbox").fill(ids[0].user_id)
        page.get_by_role("button", name="Search").click()
        expect(rows).to_have_count(1)
        expect(_row(page, ids[0])).to_be_visible()

        page.get_by_role("link", name="All").click()
        expect(rows).to_have_count(PAGE_SIZE)
        first_page = set(rows.evaluate_all("rows => rows.map(row => row.dataset.id)"))
        page.get_by_role("link", name="Next page").click()
        expect(rows).to_have_count(len(ids) - PAGE_SIZE)
        rest = set(rows.evaluate_all("rows => rows.map(row => row.dataset.id)"))
        assert first_page | rest == {str(credential_id) for credential_id in ids}

        page.get_by_role("link", name="First page").click()
        target = _row(page, ids[30])
        expect(target.locator(".version")).to_have_text("1")
        page.evaluate("window.stayed = true")  # gone if the page were loaded again
        target.get_by_role("button", name="Rotate now").click()
        expect(page.locator("#notices")).to_contain_text(f"Rotation of {ids[30]} queued")
        expect(target.locator(".version")).to_have_text("2", timeout=SELF_UPDATE_TIMEOUT_MS)
        assert page.evaluate("window.stayed") is True
        for token in sandbox.issued_tokens():
            assert token not in page.content()


def _fits_a_phone(page: Page) -> None:
    """At a phone's width each credential is a card and nothing needs scrolling sideways."""
    page.set_viewport_size(dict(zip(("width", "height"), SCREENSHOTS["phone"], strict=True)))
    expect(page.locator("table.credentials thead")).to_be_hidden()
    expect(page.get_by_role("button", name="Rotate now").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size(dict(zip(("width", "height"), SCREENSHOTS["laptop"], strict=True)))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def _screenshots(page: Page) -> None:
    """The README's pictures of the console, at a laptop's width and a phone's."""
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    for name, (width, height) in SCREENSHOTS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=docs / f"console-{name}.png")
    page.set_viewport_size(dict(zip(("width", "height"), SCREENSHOTS["laptop"], strict=True)))
