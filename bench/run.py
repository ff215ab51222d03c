"""Run the Stackduck benchmark suite: ``python -m bench.run --help`` (see bench/README.md).

Each scenario run starts its own server (``python -m stackduck_trio serve`` on a
free port) and its own producer/worker processes, prints a table, and the whole
run is written to ``bench/results/<timestamp>.json`` (logs and profiles go to
``bench/results/<timestamp>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

from . import profile as profiling
from .scenarios import BY_NAME, SCENARIOS, Ctx, Scenario
from .server import REPO, BenchError, NotApplicable, loadavg

RESULTS = REPO / "bench" / "results"
PROFILE_RATE = 250  # py-spy samples per second (bench.server.Profiler's default)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Stackduck benchmarks: throughput, latency, scale, server CPU per job.",
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "memory", "postgres", "redis"),
        default="sqlite",
        help="record store: sqlite (embedded default, fresh data dir), memory "
        "(--data-dir :memory:), postgres (DATABASE_URL from the environment), "
        "redis (DATABASE_URL + REDIS_URL: the production cluster setup)",
    )
    parser.add_argument(
        "--scenario",
        nargs="+",
        metavar="NAME",
        choices=sorted(BY_NAME),
        help="run only these scenarios (default: all); see --list",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario; median reported")
    parser.add_argument("--big", action="store_true", help="big_queue with 1,000,000 jobs")
    parser.add_argument(
        "--quick", action="store_true", help="every scenario at ~1/10 size (checks the suite)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the server during each measured window and summarise "
        "the hot spots (slows the server a little; figures are marked 'profiled')",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for 'stackduck-trio serve' (repeatable), e.g. "
        "--server-arg=--sqlite-synchronous=normal",
    )
    parser.add_argument(
        "--half-rate",
        type=float,
        help="jobs/s for latency_half* (default: half of drain_1w's measured rate)",
    )
    parser.add_argument("--output", type=pathlib.Path, help="JSON path (default: bench/results/)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


# ---------------------------------------------------------------------------------------
# medians and the table
# ---------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def median_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run if k not in keys and not k.startswith("_"))
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if key in r]
        numbers = [v for v in values if _number(v)]
        if numbers and len(numbers) == len(values):
            out[key] = statistics.median(numbers)
        elif values:
            out[key] = values[-1]
    return out


def fmt(value: Any, unit: str) -> str:
    if not _number(value):
        return "-" if value is None else str(value)
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "us":
        return f"{value:,.0f} us"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "KB":
        return f"{value:,.1f} KB"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.1f}"


_TARGET = re.compile(r"^\s*(>=|<=|<|>)\s*([\d,.]+)")


def verdict(value: Any, target: str) -> str:
    m = _TARGET.match(target)
    if not m or not _number(value):
        return ""
    bound = float(m[2].replace(",", ""))
    ok = {
        ">=": value >= bound,
        "<=": value <= bound,
        "<": value < bound,
        ">": value > bound,
    }[m[1]]
    return "ok" if ok else "MISS"


def table(results: dict[str, Any], repeat: int) -> str:
    header = ("scenario", "metric", "value", "min..max" if repeat > 1 else "", "target", "", "peer")
    rows: list[tuple[str, ...]] = [header]
    for name, entry in results.items():
        scenario = BY_NAME.get(name)
        if scenario is None:
            continue
        if entry.get("error"):
            rows.append((name, "ERROR", entry["error"].splitlines()[0][:80], "", "", "", ""))
            continue
        if entry.get("not_applicable"):
            rows.append((name, f"n/a ({entry['not_applicable']})", "", "", "", "", ""))
            continue
        med = entry["median"]
        first = True
        for metric in scenario.metrics:
            value = med.get(metric.key)
            spread = ""
            if repeat > 1:
                values = [r[metric.key] for r in entry["runs"] if _number(r.get(metric.key))]
                if values:
                    spread = f"{fmt(min(values), metric.unit)}..{fmt(max(values), metric.unit)}"
            rows.append(
                (
                    name if first else "",
                    metric.label,
                    fmt(value, metric.unit),
                    spread,
                    metric.target,
                    verdict(value, metric.target),
                    metric.peer,
                )
            )
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cells.append(cell.rjust(widths[j]) if j in (2, 3) else cell.ljust(widths[j]))
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def _profiles(runs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Profile files by window name ('profile', 'full_drain_profile', ...)."""
    found: dict[str, list[str]] = {}
    for run in runs:
        for key, value in run.items():
            if key.endswith("profile"):
                paths = [value] if isinstance(value, str) else list(value)
                found.setdefault(key, []).extend(paths)
    return found


def run_scenario(ctx: Ctx, scenario: Scenario, repeat: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    for index in range(repeat):
        ctx.scenario, ctx.run_index = scenario.name, index
        load_before = loadavg()
        t0 = time.monotonic()
        try:
            metrics = scenario.fn(ctx)
        except NotApplicable as exc:  # not a failure: shown as n/a, no further runs
            print(f"  {scenario.name}: n/a ({exc})", file=sys.stderr)
            return {"about": scenario.about, "runs": [], "not_applicable": str(exc)}
        except Exception as exc:  # noqa: BLE001 - report the scenario as ERROR, go on with the rest
            errors.append(f"{type(exc).__name__}: {exc}")
            print(f"  {scenario.name} run {index + 1}: FAILED: {exc}", file=sys.stderr)
            if not isinstance(exc, BenchError):
                traceback.print_exc()
            continue
        metrics["run_wall_s"] = time.monotonic() - t0
        metrics["loadavg_before"] = load_before
        metrics["loadavg_after"] = loadavg()
        runs.append({k: v for k, v in metrics.items() if not k.startswith("_")})
        print(
            f"  {scenario.name} run {index + 1}/{repeat} done in {metrics['run_wall_s']:.1f} s",
            file=sys.stderr,
        )
    entry: dict[str, Any] = {"about": scenario.about, "runs": runs}
    if runs:
        entry["median"] = median_metrics(runs)
        ctx.done[scenario.name] = entry["median"]
    else:
        entry["error"] = "; ".join(errors)
    if errors and runs:
        entry["failed_runs"] = errors
    if ctx.profile and runs:
        entry["profiles"] = {
            key: profiling.summarize(paths, rate=PROFILE_RATE)
            for key, paths in _profiles(runs).items()
        }
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:24} {s.about}")
        return 0
    selected = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = args.output or RESULTS / f"{stamp}.json"
    artifacts = output.with_suffix("")
    artifacts.mkdir(parents=True, exist_ok=True)
    workroot = pathlib.Path(tempfile.mkdtemp(prefix="stackduck-bench-"))
    ctx = Ctx(
        backend=args.backend,
        workroot=workroot,
        artifacts=artifacts,
        server_args=args.server_arg,
        quick=args.quick,
        big=args.big,
        profile=args.profile,
        half_rate=args.half_rate,
    )
    report: dict[str, Any] = {
        "meta": {
            "timestamp": stamp,
            "argv": sys.argv[1:] if argv is None else argv,
            "backend": args.backend,
            "server_args": args.server_arg,
            "repeat": args.repeat,
            "quick": args.quick,
            "big": args.big,
            "profiled": args.profile,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.platform(),
            "loadavg_start": loadavg(),
        },
        "scenarios": {},
    }
    print(
        f"Stackduck benchmark: backend={args.backend} repeat={args.repeat}"
        f"{' quick' if args.quick else ''}{' big' if args.big else ''}"
        f"{' profiled' if args.profile else ''}; loadavg {loadavg()}; results -> {output}",
        file=sys.stderr,
    )
    t0 = time.monotonic()
    try:
        for scenario in selected:
            print(f"[{scenario.name}] {scenario.about}", file=sys.stderr)
            entry = run_scenario(ctx, scenario, args.repeat)
            report["scenarios"][scenario.name] = entry
            report["meta"]["loadavg_end"] = loadavg()
            report["meta"]["wall_s"] = time.monotonic() - t0
            output.write_text(json.dumps(report, indent=1, default=str))
            if entry.get("error") and "not part of this build" in entry["error"]:
                print("the server refuses this backend; stopping", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("interrupted; partial results written", file=sys.stderr)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print()
    print(
        f"Stackduck benchmark, backend {args.backend}"
        f"{', quick sizes' if args.quick else ''}{', profiled' if args.profile else ''}"
        f" (median of {args.repeat}); loadavg start {report['meta']['loadavg_start']}"
        f" end {report['meta'].get('loadavg_end')}"
    )
    print(table(report["scenarios"], args.repeat))
    if args.profile:
        for name, entry in report["scenarios"].items():
            for key, summary in entry.get("profiles", {}).items():
                print()
                print(profiling.format_summary(summary, f"{name} / {key}"))
    print(f"\nJSON: {output}")
    failed = [n for n, e in report["scenarios"].items() if e.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
