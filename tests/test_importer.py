"""Bulk import: streamed, all or nothing, shared out by user; mostly as an operator runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.importing import measured_run, write_responses
from tests.conftest import ROOT, run_cli
from worker.credential import CredentialId, State
from worker.importer import ImportRefused, Share, import_responses
from worker.outcomes import Outcome
from worker.sandbox import Sandbox
from worker.secret import Secret
from worker.vault import Vault


def _one_error_line(result: Any) -> str:
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


def _in_share(responses: list[dict[str, Any]], share: Share) -> list[dict[str, Any]]:
    return [response for response in responses if share.holds(response)]


def test_a_files_memory_does_not_grow_with_it(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    """Read whole, 30,000 more responses took 26 MB more in the largest importing process."""
    peaks = []
    for count in (3_000, 33_000):
        path = tmp_path / f"{count}.json"
        write_responses(path, sandbox, count)
        command = [sys.executable, "-m", "worker", "import", str(path), "--jobs", "2"]
        run = measured_run(command, {**env, "PYTHONPATH": str(ROOT)})
        assert json.loads(run.output) == {"imported": count}
        peaks.append(run.peak_rss)

    assert peaks[1] - peaks[0] < 12 * 2**20, [peak // 2**20 for peak in peaks]
    assert len(list(vault.store.ids())) == 36_000


@pytest.mark.parametrize("shape", ["array", "lines", "lines from standard input"])
def test_a_bad_response_at_the_end_of_a_stream_stores_nothing(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path, shape: str
) -> None:
    path = tmp_path / "responses.json"
    write_responses(path, sandbox, 2_000, lines=shape != "array")
    text = path.read_text()
    bad = json.dumps({**sandbox.create_grants(1)[0], "access_token": 7})
    text = text[: text.rindex("]")] + f",{bad}]" if shape == "array" else text + bad
    path.write_text(text)

    if shape == "lines from standard input":
        result = run_cli(env, "import", "-", "--jobs", "2", stdin=text)
    else:
        result = run_cli(env, "import", str(path), "--jobs", "2")

    assert _one_error_line(result).startswith("error: response 2000 (team ")
    assert "no access_token string" in result.stderr and "nothing was stored" in result.stderr
    assert list(vault.store.ids()) == []
    assert list((tmp_path / "var").glob("import-*")) == []  # standard input's spool is gone


def test_the_first_bad_response_is_named_whichever_process_checks_it(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(10_000)  # worth two processes to any version
    first, second = Share(0, 2), Share(1, 2)
    early = {**_in_share(responses, second)[0], "access_token": ""}
    late = {**_in_share(responses, first)[0], "access_token": ""}
    file = [*responses[:5], early, *responses[5:30], late, *responses[30:]]

    result = run_cli(env, "import", "-", "--jobs", "2", stdin=json.dumps(file))

    assert _one_error_line(result).startswith(f"error: response 5 (team {early['team_id']}")
    assert list(vault.store.ids()) == []


def test_json_lines_are_imported_and_printed_as_a_list(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(3)
    lines = "\n".join(json.dumps(response) for response in responses) + "\n"

    result = run_cli(env, "import", "-", stdin=lines)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert [row["user_id"] for row in printed] == [r["user_id"] for r in responses]
    assert len(list(vault.store.ids())) == 3


def test_a_pretty_printed_file_of_one_response_prints_it(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    [response] = sandbox.create_grants(1)
    path = tmp_path / "one.json"
    path.write_text(json.dumps(response, indent=4), encoding="utf-8-sig")  # a BOM, too

    result = run_cli(env, "import", str(path))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user_id"] == response["user_id"]


def test_an_empty_file_is_refused(env: dict[str, str], vault: Vault, tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("\n")
    line = _one_error_line(run_cli(env, "import", str(path), "--jobs", "2"))
    assert line == f"error: {path}: not JSON (empty); nothing was stored"


def test_a_file_cut_short_names_where(env: dict[str, str], vault: Vault, sandbox: Sandbox) -> None:
    responses = sandbox.create_grants(3)
    text = json.dumps(responses, indent=2)
    cut = text[: text.rindex(responses[2]["refresh_token"]) + 10]  # inside the last token

    result = run_cli(env, "import", "-", "--jobs", "2", stdin=cut)

    line = _one_error_line(result)
    assert line.startswith("error: standard input: not JSON (Unterminated string")
    assert responses[2]["refresh_token"][:10] not in line  # what it read is never quoted
    assert list(vault.store.ids()) == []


def test_a_token_with_a_newline_is_imported_whole(sandbox: Sandbox, vault: Vault) -> None:
    [grant] = sandbox.create_grants(1)

    [stored] = vault.import_many([{**grant, "refresh_token": "first\nsecond"}])

    assert vault.store.load(stored.id).refresh_token == Secret("first\nsecond")


def test_import_many_tells_the_listeners_about_users_back_from_needs_reauth(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    assert vault.rotate_now(credential.id).outcome is Outcome.NEEDS_REAUTH
    changes: list[Any] = []
    vault.listeners.append(changes.append)
    back = {**sandbox.create_grants(1, team_id=credential.id.team_id)[0]}
    back["user_id"] = credential.id.user_id

    [stored] = vault.import_many([back])

    assert stored.state is State.ACTIVE and stored.version == credential.version + 1
    assert [(c.credential_id, c.old, c.new) for c in changes] == [
        (str(credential.id), State.NEEDS_REAUTH, State.ACTIVE)
    ]


def test_an_import_reads_first_while_its_batches_find_their_users_stored(
    sandbox: Sandbox, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = sandbox.create_grants(40)
    vault.import_many(responses[:20])
    put_many = vault.store.put_many
    reads: list[bool] = []

    def recorded(entries: Any, *, read_first: bool = False, **options: bool) -> Any:
        reads.append(read_first)
        return put_many(entries, read_first=read_first, **options)

    monkeypatch.setattr(vault.store, "put_many", recorded)
    stored = vault.import_many(responses, batch=10)  # stored, stored, new, new

    assert reads == [False, True, True, False]
    assert [credential.version for credential in stored] == [2] * 20 + [1] * 20


def test_an_import_in_processes_stores_each_users_repeats_in_order(
    sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(60)
    again = {**responses[7], "refresh_token": "the user's newer grant"}

    imported = import_responses(vault, [*responses, again], jobs=2, batch=10)

    assert imported.stored == imported.responses == 61
    assert len(list(vault.store.ids())) == 60
    repeated = vault.store.load(CredentialId.of(again["team_id"], again["user_id"]))
    assert repeated.version == 2 and repeated.refresh_token == Secret("the user's newer grant")


def test_an_import_run_again_skipping_the_stored_leaves_their_rotated_pairs(
    sandbox: Sandbox, vault: Vault
) -> None:
    """A migration that failed part way runs again: the users it stored may be rotated since."""
    responses = sandbox.create_grants(60)
    stored = vault.import_many(responses[:30])  # the run that failed part way
    assert vault.rotate_now(stored[0].id).outcome is Outcome.ROTATED
    before = [vault.store.load(credential.id) for credential in stored]
    again = {**responses[45], "refresh_token": "the user's newer grant"}

    imported = import_responses(vault, [*responses, again], jobs=2, skip_stored=True)

    assert (imported.stored, imported.skipped) == (31, 30)  # the rest, and one user's repeat
    assert [vault.store.load(credential.id) for credential in stored] == before
    repeated = vault.store.load(CredentialId.of(again["team_id"], again["user_id"]))
    assert repeated.version == 2 and repeated.refresh_token == Secret("the user's newer grant")
    assert vault.rotate_now(stored[0].id).outcome is Outcome.ROTATED  # its pair still works
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_an_import_skipping_the_stored_lets_a_repeat_in_a_later_batch_replace_its_user(
    sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(3)
    newer = {**responses[0], "refresh_token": "the user's newer grant"}

    stored = vault.import_many([*responses, newer], batch=2, skip_stored=True)

    assert [credential.version for credential in stored] == [1, 1, 1, 2]
    assert vault.store.load(stored[0].id).refresh_token == Secret("the user's newer grant")


def test_an_import_in_processes_with_one_bad_response_stores_nothing(
    sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(60)
    bad = {**responses[30], "access_token": ""}

    with pytest.raises(ImportRefused, match=r"^response 30 \(team \d+, user \d+\): .*no access_"):
        import_responses(vault, [*responses[:30], bad, *responses[31:]], jobs=2)

    assert list(vault.store.ids()) == []


def test_a_response_that_is_no_object_is_the_first_shares_to_report() -> None:
    shares = [Share(index, 3) for index in range(3)]
    for odd in ("a token", 7, []):
        assert [share.holds(odd) for share in shares] == [True, False, False]
    users = [{"team_id": "1", "user_id": str(user)} for user in range(30)]
    assert all(sum(share.holds(user) for share in shares) == 1 for user in users)
    assert {index for index, share in enumerate(shares) for u in users if share.holds(u)} == {
        0,
        1,
        2,
    }


def test_what_is_stored_is_what_the_check_made_of_each_response(
    sandbox: Sandbox, vault: Vault
) -> None:
    vault.clock = lambda: 1_800_000_000.0
    grants = sandbox.create_grants(4)
    responses = [
        grants[0],
        {**grants[1], "refresh_token": None, "expires_in": None},  # a token that never expires
        {**grants[2], "expires_in": "soon", "scope": 7},  # kept, with a warning
        {key: value for key, value in grants[3].items() if key not in ("scope", "token_type")},
    ]

    stored = vault.import_many(responses)

    assert stored == [vault.new_credential(*vault.named_grant(body)) for body in responses]
    assert stored[2].last_error and "expires_in" in stored[2].last_error
