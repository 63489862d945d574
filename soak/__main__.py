"""``python -m soak``: run the chaos soak and print its verdict; exit 1 if anything is off."""

from __future__ import annotations

import argparse
import logging
import sys

from soak.runner import SoakConfig, run
from worker.sandbox import DIALECTS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=15.0, help="of chaos (default 15)")
    parser.add_argument("--credentials", type=int, default=2000)
    parser.add_argument("--access-ttl", type=int, default=20, help="sandbox token lifetime")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="miro",
        help="how the sandbox words refusals; uniform: every refusal alike (default miro)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    verdict = run(
        SoakConfig(
            credentials=args.credentials,
            chaos_seconds=args.minutes * 60,
            access_ttl=args.access_ttl,
            seed=args.seed,
            dialect=args.dialect,
        )
    )
    print(verdict.table())
    return 0 if verdict.ok else 1


sys.exit(main())
