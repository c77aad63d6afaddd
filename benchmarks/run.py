"""Run every benchmark row and write ``benchmarks/results/bench.md`` and ``bench.json``.

Usage::

    python -m benchmarks.run                 # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.run --quick         # tiny sizes, 2 rounds: checks the code runs, numbers mean little
    python -m benchmarks.run --rows q_sample,embedding --threads 2 --out /tmp/bench

Every row is a ratio of two things timed side by side in this process (see ``benchmarks/_harness.py``); absolute
times are context. A row's status is PASS/MISS against the goal of issue 5, "info" where no goal applies, "quick"
in a --quick run (no verdict), ERROR when the row could not run (the message is in the context column). The exit
status is 1 when any row is ERROR.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks._harness import Config, Result, fmt_goal, fmt_value

log = logging.getLogger("benchmarks")

# row name -> module with ``run(cfg) -> list[Result]``, in table order
ROWS: dict[str, str] = {
    "q_sample": "benchmarks.bench_q_sample",
    "embedding": "benchmarks.bench_embedding",
    "checkpointing": "benchmarks.bench_checkpointing",
    "blending": "benchmarks.bench_blending",
    "training": "benchmarks.bench_training",
    "ddim": "benchmarks.bench_ddim",
    "resume": "benchmarks.bench_resume",
    "quality": "benchmarks.bench_quality",
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("lightning", "diffusers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # an optional package missing is reported, not fatal
            out[name] = "not installed"
    return out


def run_rows(names: Sequence[str], cfg: Config) -> tuple[list[Result], dict[str, float]]:
    """Run the named rows; a row that raises becomes one ERROR result carrying the exception."""
    results: list[Result] = []
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        log.info("row %s ...", name)
        try:
            module = importlib.import_module(ROWS[name])
            rows = module.run(cfg)
        except Exception as err:
            log.error("row %s failed:\n%s", name, traceback.format_exc())
            rows = [Result(name, "-", "-", math.nan, None, context=f"{type(err).__name__}: {err}"[:300])]
        for row in rows:
            row.quick = cfg.quick
        seconds[name] = time.perf_counter() - t0
        log.info("row %s done in %.1f s", name, seconds[name])
        results.extend(rows)
    return results, seconds


def _busy_warning(meta: dict[str, Any]) -> list[str]:
    loads = [v for v in meta["load_average_before_after"] if v is not None]
    cpus = meta["cpu_count"] or 1
    if not loads or max(loads) < 0.75 * cpus:
        return []
    return [
        "",
        f"**Warning: the machine was busy (1-minute load average {', '.join(map(str, loads))} on {cpus} CPUs).** "
        "Other processes competing for the cores stall multi-threaded kernels and inflate the ratios; rerun on an "
        "idle machine, or with `--threads 1 --clock cpu`.",
    ]


def markdown(results: Sequence[Result], meta: dict[str, Any]) -> str:
    """The table, with a header saying where and how it was measured."""
    lines = [
        "# lightning_ldm benchmarks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']}, {meta['cpu_count']} CPUs, torch threads = {meta['torch_threads']}, "
        f"interop threads = {meta['torch_interop_threads']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"Date: {meta['date']}; wall time {meta['wall_s']:.0f} s; {meta['rounds']} interleaved rounds per "
        f"measurement, {meta['clock']} clock{' (QUICK: tiny sizes, numbers not meaningful)' if meta['quick'] else ''}",
        "",
        "Each value is the median over rounds of (ours / reference), both timed side by side in the same round; "
        "absolute times are context only.",
        *_busy_warning(meta),
        "",
        "| row | case | compared | value | goal | status | context |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r.row, r.case, r.compared, fmt_value(r.value, r.unit), fmt_goal(r), r.status, r.context]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "MISS", "info", "quick", "ERROR")}
    lines += ["", "Summary: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or CPU time of this process (use with --threads 1 on a busy machine)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or torch.get_num_threads())  # fixed for the whole run, and reported
    torch.manual_seed(0)
    cfg = Config.make(args.quick, args.rounds, args.clock)

    load_before = _load_average()
    t0 = time.perf_counter()
    results, seconds = run_rows(names, cfg)
    meta: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": _versions(),
        "quick": cfg.quick,
        "rounds": cfg.rounds,
        "clock": cfg.clock,
        "row_seconds": seconds,
        "wall_s": time.perf_counter() - t0,
        "load_average_before_after": [load_before, _load_average()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, meta)
    (args.out / "bench.md").write_text(md)
    payload = {"meta": meta, "results": [r.to_json() for r in results]}
    (args.out / "bench.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    sys.stdout.write(md)
    log.info("wrote %s and %s", args.out / "bench.md", args.out / "bench.json")
    return 1 if any(r.status == "ERROR" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
