"""`python -m bench <scenario>... | all`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import chaos, context_aware, host_caches, scenarios, telemetry
from bench.harness import RESULTS_DIR, Options
from bench.report import write_summary
from bench.steps import Scenario
from bench.wrk import WrkMissing, find_wrk

log = logging.getLogger("bench")

# Every scenario, in the order `all` runs them and the summary lists them.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    scenarios.ceiling, scenarios.hostile, scenarios.instances, scenarios.naive, scenarios.workers,
    scenarios.policies, scenarios.seed, scenarios.pool, scenarios.startup, scenarios.soak, scenarios.mix,
    context_aware.context, host_caches.caches, telemetry.telemetry, chaos.chaos,
)}

# A few seconds per scenario: keeps the harness working (tests/test_bench.py), measures nothing.
QUICK = {
    "duration": 1.0, "warmup": 0.5, "repeats": 1, "transports": ("http",), "worker_counts": (1, 2),
    "soak_requests": 5_000, "soak_warmup_requests": 500, "soak_segment": 1.0, "soak_max_seconds": 20.0,
    "startup_repeats": 1, "interval": 0.25, "pool_burst_seconds": 4.0, "pool_scale_down_seconds": 2.0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="kwserver load tests: wrk load and psutil resource samples of the server, reported together.",
        epilog="Scenarios: " + "; ".join(f"{s.name}: {s.title}" for s in SCENARIOS.values()),
    )
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO", choices=[*SCENARIOS, "all"],
                        help="scenario names, or `all` (every scenario, then SUMMARY.md)")
    d = Options()
    parser.add_argument("--duration", type=float, default=None, help=f"seconds per load point ({d.duration:g})")
    parser.add_argument("--warmup", type=float, default=None, help=f"unmeasured warm-up seconds ({d.warmup:g})")
    parser.add_argument("--repeats", type=int, default=None, help=f"repeats per load point ({d.repeats})")
    parser.add_argument("--connections", type=int, default=None, help=f"wrk connections ({d.connections})")
    parser.add_argument("--workers", type=int, default=None, help=f"server workers ({d.workers})")
    parser.add_argument("--interval", type=float, default=None, help=f"sampling interval, s ({d.interval:g})")
    parser.add_argument("--transports", default=None, help="comma-separated: http,https (both)")
    parser.add_argument("--soak-requests", type=int, default=None,
                        help=f"requests after warm-up in `soak` ({d.soak_requests:,})")
    parser.add_argument("--config", dest="ten_policy_config", default=None,
                        help="the ten-policy config (default: deploy/examples/policies.yml, else a fallback)")
    parser.add_argument("--config-61", dest="sixty_one_policy_config", default=None,
                        help="the 61-policy config (default: deploy/examples/policies-61.yml, else a fallback)")
    parser.add_argument("--no-balance", dest="balance", action="store_false", default=None,
                        help="measure connections as they land on the workers (no restart of a load point "
                             "that left a worker idle)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results directory (bench/results)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny durations and one repeat: checks the harness, measures nothing")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    values: dict = dict(QUICK) if args.quick else {}
    for name in ("duration", "warmup", "repeats", "connections", "workers", "interval", "soak_requests",
                 "ten_policy_config", "sixty_one_policy_config", "balance"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.transports:
        transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
        bad = set(transports) - {"http", "https"}
        if bad:
            raise SystemExit(f"unknown transport(s): {', '.join(sorted(bad))}")
        values["transports"] = transports
    values["results"] = args.results.resolve()
    return dataclasses.replace(Options(), **values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        find_wrk()
    except WrkMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    options = options_from(args)
    # One warm compile cache for the whole invocation (startup makes its own cold ones).
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    cache.chmod(0o700)
    options = dataclasses.replace(options, cache_dir=cache)
    started = time.monotonic()
    failed = []
    try:
        for name in names:
            t0 = time.monotonic()
            log.info("=== %s: %s", name, SCENARIOS[name].title)
            try:
                SCENARIOS[name].run(options)
            except Exception as exc:  # the report records it; go on with the other scenarios
                log.exception("scenario %s failed", name)
                failed.append(f"{name}: {exc}")
            log.info("=== %s done in %.0f s -> %s", name, time.monotonic() - t0, options.results / name)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    total = time.monotonic() - started
    summary = write_summary(options.results, SCENARIOS, total if "all" in args.scenarios else None)
    log.info("summary: %s (%.0f s in all)", summary, total)
    for failure in failed:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failed else 0
