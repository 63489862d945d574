"""``python -m worker``: the operator's commands.

Every command prints JSON or a table without a single secret, except ``token``, whose whole
point is to print one. Exit codes: 0 done, 1 the command failed (one line on stderr says
why), 2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from settings import SettingsError, get_settings
from worker import miro
from worker.credential import CredentialId, InvalidCredentialId
from worker.crypto import UndecryptableError, generate_key
from worker.record import CorruptRecordError, describe_record
from worker.rotation import Outcome
from worker.store import NotFoundError
from worker.vault import Vault, VaultError

log = logging.getLogger("worker")

#: Outcomes after which ``rotate`` exits 0: the credential holds a valid pair.
GOOD_OUTCOMES = {Outcome.ROTATED, Outcome.LOST_RACE, Outcome.SKIPPED_FRESH, Outcome.NOT_EXPIRING}

#: The failures a command reports as one line and exit code 1.
EXPECTED_ERRORS = (
    SettingsError,
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


def _vault() -> Vault:
    return Vault.from_settings(get_settings())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def cmd_exchange(args: argparse.Namespace) -> None:
    _print_json(_vault().exchange(args.code).public())


def cmd_import(args: argparse.Namespace) -> None:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{args.file}: not JSON ({error.msg} at line {error.lineno})") from None
    responses = body if isinstance(body, list) else [body]
    vault = _vault()
    stored = [vault.import_response(response).public() for response in responses]
    _print_json(stored if isinstance(body, list) else stored[0])


def cmd_rotate(args: argparse.Namespace) -> None:
    if not args.now:
        raise CommandError("queueing arrives with the refresh service; use --now for now")
    result = _vault().rotate_now(CredentialId.parse(args.id))
    _print_json(result.as_dict())
    if result.outcome not in GOOD_OUTCOMES:
        raise CommandError(f"rotation of {args.id} ended {result.outcome}: {result.detail}")


def cmd_token(args: argparse.Namespace) -> None:
    print(_vault().access_token(CredentialId.parse(args.id)).reveal())


def _listing(vault: Vault) -> Iterator[dict[str, Any]]:
    for credential_id in sorted(vault.store.ids()):
        data = vault.store.raw(credential_id)
        if data is None:
            continue
        try:
            yield describe_record(credential_id, data)
        except CorruptRecordError as error:
            yield {"id": str(credential_id), "state": "corrupt", "last_error": str(error)}


def cmd_list(args: argparse.Namespace) -> None:
    rows = list(_listing(_vault()))
    if args.json:
        _print_json(rows)
        return
    print(f"{'ID':<42} {'STATE':<14} {'VERSION':>7}  {'ACCESS EXPIRES':>14}  LAST ERROR")
    for row in rows:
        print(
            f"{row['id']:<42} {row['state']:<14} {row.get('version') or '-':>7}  "
            f"{row.get('access_expires_at') or '-':>14}  {(row.get('last_error') or '')[:60]}"
        )


def cmd_gen_key(args: argparse.Namespace) -> None:
    print(generate_key())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="Keeps Miro OAuth credentials alive."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None], help: str) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("exchange", cmd_exchange, "trade an authorization code for a stored credential") \
        .add_argument("code")
    command("import", cmd_import, "store Miro token responses (an object or a list) from a file") \
        .add_argument("file", help="a JSON file, or - for standard input")
    rotate = command("rotate", cmd_rotate, "rotate a credential's token pair now")
    rotate.add_argument("id", help="<team_id>:<user_id>")
    rotate.add_argument("--now", action="store_true", help="rotate in this process")
    command("token", cmd_token, "print a valid access token (refreshed first if due)") \
        .add_argument("id", help="<team_id>:<user_id>")
    command("list", cmd_list, "list credentials (no secrets)") \
        .add_argument("--json", action="store_true")
    command("gen-key", cmd_gen_key, "print a new Fernet key for TOKEN_ENCRYPTION_KEYS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except (CommandError, *EXPECTED_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
