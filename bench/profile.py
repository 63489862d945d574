"""How big and how long each benchmark runs: ``--quick`` (the default) or ``--full``.

The quick profile fits in ten minutes on a 2-core machine and still measures every target
(the 1M-credential figures only in the full profile); the full one takes about half an hour.
A tiny profile serves the smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one run of the suite."""

    name: str
    #: Store sizes at which memory, the scan tick and the naive scan are measured.
    store_sizes: tuple[int, ...]
    #: Scan ticks timed at each size and number due.
    scan_repeats: int
    #: Passes of those ticks with nothing due, some seconds apart: this VM slows whole
    #: stretches of seconds, and a pass can fall in one (the fastest tick decides flatness).
    idle_passes: int
    #: Credentials due at once in the "1,000 due" scan measurement.
    due: int
    #: Sandbox latencies (ms) and worker concurrencies of the throughput grid.
    latencies_ms: tuple[float, ...]
    concurrencies: tuple[int, ...]
    #: Runs of the service and of the bare loop at the point the targets are about (the
    #: slowest latency, the default concurrency); its figures are their medians, as single
    #: runs on a small VM vary by about 20 % from one minute to the next.
    target_runs: int
    #: Seconds a worker runs before, and then while, its rate and CPU are measured.
    warmup_s: float
    window_s: float
    #: Freshness: credentials, the sandbox's access token lifetime, and how long it runs.
    fresh_credentials: int
    fresh_ttl: int
    fresh_run_s: float
    #: Forced rotations timed in a warm process, and through the real CLI process.
    forced_samples: int
    cli_samples: int
    #: Credentials imported one by one and with ``appendfsync everysec``, beside the batches.
    seed_side_sample: int
    #: Responses in the file of the import benchmark, and its runs of the floor and the
    #: command, in turn.
    import_responses: int
    import_pairs: int


QUICK = Profile(
    name="quick",
    store_sizes=(10_000, 100_000),
    scan_repeats=10,
    idle_passes=3,
    due=1000,
    latencies_ms=(0.0, 150.0),
    concurrencies=(16, 64),
    target_runs=1,
    warmup_s=3.0,
    window_s=8.0,
    fresh_credentials=100_000,
    fresh_ttl=1800,
    fresh_run_s=120.0,
    forced_samples=60,
    cli_samples=3,
    seed_side_sample=5_000,
    import_responses=300_000,
    import_pairs=1,
)

FULL = Profile(
    name="full",
    store_sizes=(10_000, 100_000, 1_000_000),
    scan_repeats=30,
    idle_passes=3,
    due=1000,
    latencies_ms=(0.0, 150.0),
    concurrencies=(16, 32, 64, 96, 128),
    target_runs=3,
    warmup_s=5.0,
    window_s=20.0,
    fresh_credentials=100_000,
    fresh_ttl=1800,
    fresh_run_s=480.0,
    forced_samples=300,
    cli_samples=10,
    seed_side_sample=20_000,
    import_responses=1_000_000,
    import_pairs=2,
)

#: For the smoke test: every code path, tiny sizes, seconds.
TINY = Profile(
    name="tiny",
    store_sizes=(500, 2_000),
    scan_repeats=2,
    idle_passes=1,
    due=50,
    latencies_ms=(0.0,),
    concurrencies=(4,),
    target_runs=1,
    warmup_s=0.5,
    window_s=1.0,
    fresh_credentials=300,
    fresh_ttl=30,
    fresh_run_s=8.0,
    forced_samples=3,
    cli_samples=0,
    seed_side_sample=200,
    import_responses=2_000,
    import_pairs=1,
)

PROFILES = {profile.name: profile for profile in (QUICK, FULL, TINY)}
