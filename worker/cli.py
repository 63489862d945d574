"""``python -m worker``: the operator's commands.

Every command prints JSON or text without a single secret, except ``token``, whose whole
point is to print one. Text shows times as :func:`worker.human_time.human_time` writes them;
``--json`` keeps them in epoch seconds. Exit codes: 0 done, 1 the command failed (one line on
stderr says why), 2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from tqdm import tqdm

from settings import SettingsError, get_settings
from worker import doctor, miro
from worker.capacity import TOKEN_RATE, WORKERS_SHORT, Capacity, per_second
from worker.credential import Credential, CredentialId, InvalidCredentialId
from worker.crypto import UndecryptableError, generate_key
from worker.demo import DemoError, use_running_demo
from worker.forced import queue_rotation
from worker.human_time import human_time
from worker.idindex import reindex, stored_count
from worker.importer import import_responses, response_file
from worker.outcomes import Outcome
from worker.record import CorruptRecordError
from worker.rekey import rekey_all
from worker.status import Status, read_status, recount_states
from worker.store import NotFoundError
from worker.vault import NotRevoked, Vault, VaultError
from worker.web.state import OAuthStates, authorize_link, secret_key

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

JSON_HELP = "print JSON, for scripts: times in epoch seconds"

log = logging.getLogger("worker")

#: Outcomes after which ``rotate`` exits 0: the credential holds a valid pair.
GOOD_OUTCOMES = {Outcome.ROTATED, Outcome.LOST_RACE, Outcome.SKIPPED_FRESH, Outcome.NOT_EXPIRING}

#: The failures a command reports as one line and exit code 1.
EXPECTED_ERRORS = (
    SettingsError,
    DemoError,
    VaultError,
    NotFoundError,
    InvalidCredentialId,
    CorruptRecordError,
    UndecryptableError,
    miro.MiroError,
    redis.RedisError,
    OSError,
    ValueError,
)


class CommandError(Exception):
    """The command ran but did not achieve what was asked; its message is the one line."""


#: A command: it returns its exit status, or None for 0.
Handler = Callable[[argparse.Namespace], int | None]


def _vault() -> Vault:
    return Vault.from_settings(get_settings())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _time(at: float | None, now: float) -> str:
    """A time in a table or a report: see :func:`human_time`; ``-`` when there is none."""
    return "-" if at is None else human_time(at, now)


def cmd_exchange(args: argparse.Namespace) -> None:
    _print_json(_vault().exchange(args.code).public())


def cmd_import(args: argparse.Namespace) -> None:
    vault = _vault()
    with response_file(args.file, vault.settings.data_dir) as responses:
        if args.jobs > 1 or args.skip_stored:
            imported = import_responses(
                vault, responses, jobs=args.jobs, skip_stored=args.skip_stored
            )
            counts = {"imported": imported.stored}
            _print_json({**counts, "skipped": imported.skipped} if args.skip_stored else counts)
            return
        printer = StoredPrinter()
        import_responses(vault, responses, on_stored=printer.add)
        printer.close(one=responses.array is False)


class StoredPrinter:
    """Prints credentials as they are stored: a million would not fit in memory at once.

    As a JSON list, or as one object for a file of one response (not in a list).
    """

    def __init__(self) -> None:
        self._first: dict[str, object] | None = None
        self._listed = False

    def add(self, credentials: list[Credential]) -> None:
        for credential in credentials:
            if self._first is None and not self._listed:
                self._first = credential.public()
                continue
            if not self._listed:
                sys.stdout.write("[\n" + _indented(self._first))
                self._listed = True
            sys.stdout.write(",\n" + _indented(credential.public()))

    def close(self, *, one: bool) -> None:
        if self._listed:
            sys.stdout.write("\n]\n")
        elif one and self._first is not None:
            _print_json(self._first)
        else:
            _print_json([self._first] if self._first is not None else [])


def _indented(value: object) -> str:
    """``value`` as an element of a list that :func:`_print_json` prints."""
    return "  " + json.dumps(value, indent=2).replace("\n", "\n  ")


def cmd_rotate(args: argparse.Namespace) -> None:
    vault = _vault()
    ids = _selected_ids(vault, args)
    if args.now:
        results = [vault.rotate_now(credential_id) for credential_id in _progress(ids, args)]
        outcomes = [result.as_dict() for result in results]
    else:
        outcomes = queue_rotations(vault, ids, wait=args.wait, progress=_progress_bar(args))
    if args.json:
        _print_json(outcomes[0] if args.id and outcomes else outcomes)
    else:
        _print_rotations(outcomes)
    bad = [item for item in outcomes if item.get("outcome") not in GOOD_OUTCOMES]
    if bad and (args.now or args.wait):
        raise CommandError(f"{len(bad)} of {len(outcomes)} rotations did not succeed")


def _print_rotations(rows: list[dict[str, Any]]) -> None:
    """One line per credential: the task it was queued as, or what its rotation did."""
    if rows and "task_id" in rows[0]:
        for row in rows:
            print(f"{row['credential_id']:<42} queued as task {row['task_id']}")
        return
    now = time.time()
    print(f"{'ID':<42} {'OUTCOME':<14} {'VERSION':>7}  {'NEXT REFRESH':<36}  DETAIL")
    for row in rows:
        print(
            f"{row['credential_id']:<42} {row['outcome']:<14} {row.get('version') or '-':>7}  "
            f"{_time(row.get('retry_at'), now):<36}  {row.get('detail') or ''}"
        )


def _selected_ids(vault: Vault, args: argparse.Namespace) -> list[CredentialId]:
    chosen = [bool(args.id), bool(args.team), args.all]
    if sum(chosen) != 1:
        raise CommandError("name one of: a credential ID, --team TEAM_ID, --all")
    if args.id:
        return [CredentialId.parse(args.id)]
    team = CredentialId.of(args.team, "x").team_id if args.team else None
    return sorted(vault.store.ids(team))


def _progress_bar(args: argparse.Namespace) -> bool:
    return not args.id and sys.stderr.isatty()


def _progress(ids: list[CredentialId], args: argparse.Namespace) -> Iterator[CredentialId]:
    return iter(tqdm(ids, unit="cred", disable=not _progress_bar(args), file=sys.stderr))


def queue_rotations(
    vault: Vault, ids: list[CredentialId], *, wait: bool, progress: bool
) -> list[dict[str, Any]]:
    """Queue forced rotations (merged with any that commit after this call) for the workers."""
    pending = [
        queue_rotation(credential_id, vault.rotator.version_now(credential_id))
        for credential_id in tqdm(ids, desc="queued", disable=not progress, file=sys.stderr)
    ]
    if not wait:
        return [
            {"credential_id": str(cid), "task_id": task.id}
            for cid, task in zip(ids, pending, strict=True)
        ]
    timeout = vault.settings.lock_ttl + vault.settings.http_timeout + 60
    return [
        task.get(timeout=timeout)
        for task in tqdm(pending, desc="rotated", disable=not progress, file=sys.stderr)
    ]


def cmd_token(args: argparse.Namespace) -> None:
    print(_vault().access_token(CredentialId.parse(args.id)).reveal())


def cmd_list(args: argparse.Namespace) -> None:
    vault = _vault()
    rows = list(vault.store.describe(sorted(vault.store.ids())))
    if args.json:
        _print_json(rows)
        return
    now = time.time()
    print(f"{'ID':<42} {'STATE':<14} {'VERSION':>7}  {'ACCESS EXPIRES':<36}  LAST ERROR")
    for row in rows:
        print(
            f"{row['id']:<42} {row['state']:<14} {row.get('version') or '-':>7}  "
            f"{_time(row.get('access_expires_at'), now):<36}  "
            f"{(row.get('last_error') or '')[:60]}"
        )


def cmd_gen_key(args: argparse.Namespace) -> None:
    print(generate_key())


def cmd_rotate_key(args: argparse.Namespace) -> None:
    vault = _vault()
    ids = list(vault.store.ids())
    with tqdm(total=len(ids), unit="cred", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        report = rekey_all(vault.store, ids, on_progress=bar.update)
    print(
        f"{report.reencrypted} re-encrypted, {report.already_current} already under the first "
        f"key, {report.undecryptable} undecryptable, {report.corrupt} corrupt, "
        f"{report.busy} busy"
    )
    if not report.old_keys_removable:
        raise CommandError("some records still need attention; run rotate-key again later")
    print("every record is under the first key: the old keys can be removed")


def cmd_status(args: argparse.Namespace) -> None:
    vault = _vault()
    if args.recount:
        recount_states(vault)
    now = time.time()
    status = read_status(vault, now)
    if args.json:
        _print_json(status.as_dict())
    else:
        _print_status(status, now)
    if not status.healthy:
        shortfalls = "".join(f"; {line}" for line in status.capacity.shortfalls().values())
        raise CommandError(
            f"unhealthy: {status.overdue} overdue, paused: {status.paused or 'no'}, "
            f"{status.journal_pending} pairs waiting in the journal{shortfalls}"
        )


def _print_status(status: Status, now: float) -> None:
    def expiry(seconds_from_now: float | None) -> str:
        return _time(None if seconds_from_now is None else now + seconds_from_now, now)

    print(f"credentials:            {status.credentials:,}")
    for state, count in status.by_state.items():
        print(f"  {state:<22}{count:,}")
    print(f"overdue:                {status.overdue:,}")
    print(f"soonest access expiry:  {expiry(status.soonest_access_expiry_in)}")
    print(f"soonest refresh expiry: {expiry(status.soonest_refresh_expiry_in)}")
    print(f"paused:                 {status.paused or 'no'}")
    print(f"journal:                {status.journal_pending} pending")
    _print_capacity(status.capacity)
    for row in status.failing:
        print(f"  failing {row['id']} [{row['state']}] x{row['failure_count']}: ", end="")
        print(row["last_error"])


def _print_capacity(capacity: Capacity) -> None:
    short = {name: " SHORT" for name in capacity.short_of}
    unmeasured = capacity.unmeasured_workers
    print(
        f"refreshes needed:       {per_second(capacity.needed)} "
        f"(steady {per_second(capacity.steady)}, due soon {per_second(capacity.due_soon)})"
    )
    print(f"MIRO_TOKEN_RATE:        {per_second(capacity.token_rate)}{short.get(TOKEN_RATE, '')}")
    print(
        f"workers:                {capacity.workers} seen, can do "
        f"{per_second(capacity.worker_capacity)}{short.get(WORKERS_SHORT, '')}, doing "
        f"{per_second(capacity.worker_throughput)}"
        + (f" ({unmeasured} not yet measured)" if unmeasured else "")
    )


def cmd_reindex(args: argparse.Namespace) -> None:
    vault = _vault()
    with tqdm(
        total=stored_count(vault.redis),
        unit="cred",
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
    ) as bar:
        indexed = reindex(vault.redis, on_progress=bar.update)
    print(f"{indexed} records indexed; the id index is complete")


def cmd_resume(args: argparse.Namespace) -> None:
    resumed = _vault().rotator.guard.resume()
    print("resumed" if resumed else "was not paused")


def _refuse_open_without_login(what: str, address: str, login: str | None, variable: str) -> None:
    if address not in LOOPBACK and not login:
        raise CommandError(
            f"{what} would listen on {address} without a login: set {variable}="
            "user:password (or listen on 127.0.0.1)"
        )


def cmd_flower(args: argparse.Namespace) -> None:
    from worker.flower import command_line  # noqa: PLC0415 - Flower and tornado: flower only

    get_settings()  # a bad setting is reported here, in one line, not by Celery's app loader
    os.execv(sys.executable, command_line(args.address, args.port))


def cmd_web(args: argparse.Namespace) -> None:
    settings = get_settings()
    _refuse_open_without_login(
        "The web page", args.address, settings.web_basic_auth, "WEB_BASIC_AUTH"
    )
    from worker.web.app import create_app  # noqa: PLC0415 - Flask and tornado: web only
    from worker.web.serving import serve  # noqa: PLC0415

    serve(create_app(_vault(), args.address), args.address, args.port, args.threads)


def cmd_revoke(args: argparse.Namespace) -> None:
    credential_id = CredentialId.parse(args.id)
    try:
        known = _vault().revoke(credential_id)
    except miro.MiroError as error:
        raise CommandError(
            f"Miro could not be asked to revoke {credential_id} ({error}); the credential is "
            "kept: run revoke again once Miro answers"
        ) from None
    except NotRevoked as error:
        raise CommandError(
            f"{credential_id} is not revoked: {error}. The credential is kept: run revoke "
            "again once that is fixed"
        ) from None
    _print_json({"id": str(credential_id), "known_to_miro": known, "deleted": True})


def cmd_connect_url(args: argparse.Namespace) -> None:
    vault = _vault()
    vault.settings.require_miro_app()
    states = OAuthStates(vault.redis, secret_key(vault.settings))
    url, _ = authorize_link(vault.client, states, browser=False, team_id=args.team)
    print(url)


def cmd_doctor(args: argparse.Namespace) -> None:
    findings = doctor.run()
    print(doctor.report(findings))
    failed = sum(finding.level is doctor.Level.FAIL for finding in findings)
    if failed:
        raise CommandError(f"{failed} problem(s) to fix, listed above")


def cmd_dev(args: argparse.Namespace) -> int:
    from worker import dev  # noqa: PLC0415 - the sandbox and launcher are for this command only

    ports = dev.Ports(args.port, args.flower_port, args.sandbox_port, args.redis_port)
    return dev.run(get_settings(), ports)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.sandbox.__main__ import main as sandbox_main  # noqa: PLC0415 - Flask: sandbox only

    return sandbox_main(args.sandbox_args, prog="python -m worker sandbox")


def port(text: str) -> int:
    """A TCP port, for argparse (which names it in its error)."""
    number = int(text)
    if not 0 < number < 65536:
        raise ValueError(text)
    return number


def processes(text: str) -> int:
    """A number of processes, 1 or more, for argparse (which names it in its error)."""
    number = int(text)
    if number < 1:
        raise ValueError(text)
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="Keeps Miro OAuth credentials alive."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run the command against the running demo (`make run`), not the configured store",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str, **options: Any) -> Any:
        sub = commands.add_parser(name, help=help, description=help, **options)
        sub.set_defaults(handler=handler)
        return sub

    command(
        "exchange", cmd_exchange, "trade an authorization code for a stored credential"
    ).add_argument("code")
    bulk = command("import", cmd_import, "store Miro token responses from a file, all or nothing")
    bulk.add_argument(
        "file", help="a JSON file (an object, a list, or JSON Lines), or - for standard input"
    )
    bulk.add_argument(
        "--jobs",
        type=processes,
        default=1,
        metavar="N",
        help="store in N processes (one per core for a migration); prints only the count",
    )
    bulk.add_argument(
        "--skip-stored",
        action="store_true",
        help="leave users already stored as they are (to run again an import that failed "
        "part way); prints only the counts",
    )
    rotate = command("rotate", cmd_rotate, "force a rotation (queued for the workers)")
    rotate.add_argument("id", nargs="?", help="<team_id>:<user_id>")
    rotate.add_argument("--team", metavar="TEAM_ID", help="every credential of a team")
    rotate.add_argument("--all", action="store_true", help="every credential")
    rotate.add_argument("--wait", action="store_true", help="wait for the workers' results")
    rotate.add_argument("--now", action="store_true", help="rotate in this process")
    rotate.add_argument("--json", action="store_true", help=JSON_HELP)
    command("token", cmd_token, "print a valid access token (refreshed first if due)").add_argument(
        "id", help="<team_id>:<user_id>"
    )
    command("list", cmd_list, "list credentials (no secrets)").add_argument(
        "--json", action="store_true", help=JSON_HELP
    )
    command("gen-key", cmd_gen_key, "print a new Fernet key for TOKEN_ENCRYPTION_KEYS")
    command("rotate-key", cmd_rotate_key, "re-encrypt every record under the first key")
    status = command(
        "status", cmd_status, "health: counts, overdue, expiries, failures (exit 1 if bad)"
    )
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    status.add_argument(
        "--recount", action="store_true", help="rebuild the counts by state first (O(N))"
    )
    command(
        "reindex",
        cmd_reindex,
        "index the records stored before the id index, for the console (O(N), resumable)",
    )
    command("resume", cmd_resume, "resume refreshing after an incident paused it")
    flower = command("flower", cmd_flower, "run Flower (a login is required beyond localhost)")
    flower.add_argument("--address", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    web = command("web", cmd_web, "serve the web page (a login is required beyond localhost)")
    web.add_argument("--address", default="127.0.0.1")
    web.add_argument("--port", type=int, default=5000)
    web.add_argument("--threads", type=int, default=16, help="requests served at once")
    command("revoke", cmd_revoke, "disconnect: revoke at Miro, then delete").add_argument(
        "id", help="<team_id>:<user_id>"
    )
    command(
        "connect-url", cmd_connect_url, "print a single-use authorize link to send to a user"
    ).add_argument("--team", metavar="TEAM_ID", help="the team the user installs the app in")
    command("doctor", cmd_doctor, "check settings, keys, Redis and Miro; say what to fix")
    dev = command(
        "dev",
        cmd_dev,
        "run everything locally: without a Miro app, the demo (its own Redis, the sandbox and "
        "users); with one, worker, beat, Flower and web against your store",
    )
    ports = dev.add_argument_group("ports, on 127.0.0.1")
    ports.add_argument("--port", type=port, default=5000, help="the web page's (5000)")
    ports.add_argument("--flower-port", type=port, default=5555, help="Flower's (5555)")
    ports.add_argument("--sandbox-port", type=port, default=8765, help="the demo's sandbox (8765)")
    # Not the embedded Redis's 6479: the demo's Redis is another one.
    ports.add_argument("--redis-port", type=port, default=6480, help="the demo's Redis (6480)")
    # Its options are the sandbox's own, passed on as they are.
    command(
        "sandbox", cmd_sandbox, "run the Miro sandbox (options: sandbox --help)", add_help=False
    )
    return parser


def _use_running_demo(command: str) -> None:
    if command == "dev":
        raise CommandError("--demo runs a command beside the running demo; `dev` starts one")
    use_running_demo(os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "sandbox":
        args.sandbox_args = unknown
    elif "--demo" in unknown:
        parser.error(f"--demo goes before the command: python -m worker --demo {args.command}")
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.demo:
            _use_running_demo(args.command)
        return args.handler(args) or 0
    except (CommandError, *EXPECTED_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
