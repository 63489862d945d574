"""``python -m bench``: run the performance suite, print its tables, keep its figures.

    python -m bench            # quick: under ten minutes on a 2-core machine
    python -m bench --full     # full: 1M credentials, the whole concurrency grid (~30 min)
    python -m bench --only growth throughput
    python -m bench --replot bench/results/full.json   # print and draw a saved run again

Prints Markdown tables (the README's "Performance" section is a copy), writes the figures to
``bench/results/<profile>.json`` and draws ``scan_cost.png`` and ``freshness.png`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import console, forced, freshness, growth, importing, report, throughput
from bench.profile import PROFILES, Profile

BENCHMARKS: dict[str, Callable[[Profile], list[report.Section]]] = {
    "growth": growth.run,  # seeding, memory, scan cost
    "import": importing.run,  # the import command against the bare floor
    "throughput": throughput.run,
    "freshness": freshness.run,
    "forced": forced.run,
    "console": console.run,  # the web console's pages and the id index's memory
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick")
    size.add_argument("--full", dest="profile", action="store_const", const="full")
    size.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    parser.set_defaults(profile="quick")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="where figures go")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="print and draw a saved run, run nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        sections = [report.Section.from_dict(section) for section in saved["sections"]]
        print(report.render(sections, saved["machine"], saved["command"]))
        args.out.mkdir(parents=True, exist_ok=True)
        report.draw(sections, args.out)
        return 0
    profile = PROFILES[args.profile]
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    info = report.machine()
    sections: list[report.Section] = []
    started = time.monotonic()
    for name in args.only or list(BENCHMARKS):
        print(f"running {name} ({profile.name})...", file=sys.stderr, flush=True)
        sections += BENCHMARKS[name](profile)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["duration_s"] = round(time.monotonic() - started)
    print(report.render(sections, info, command.strip()))
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(sections, info, command.strip(), args.out / f"{profile.name}.json")
    report.draw(sections, args.out)
    return 0 if all(c.met is not False for s in sections for c in s.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
