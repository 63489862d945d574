"""Run a command as a user would, and tell how long it took and its largest process's peak memory.

    python -m bench.timed RESULT.json COMMAND [ARGUMENTS...]

The command's output goes where this one's goes; RESULT.json gets its wall time, its CPU time
and the peak resident memory of its largest process, itself or a child (``ru_maxrss`` as
``wait4`` reports it). A process of its own, small, because that peak counts the memory of
the process that started the command too (``exec`` keeps the larger of the two): started
from a benchmark holding a million grants, every command would seem to hold as much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    result, *command = argv
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    measured = {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "exit_code": os.waitstatus_to_exitcode(status),
    }
    Path(result).write_text(json.dumps(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
