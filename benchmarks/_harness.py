"""Timing and reporting shared by the benchmark rows.

Every row compares two things measured in the same process, interleaved: after a warm-up, each round runs every
contender once (a "sample" of ``inner`` calls, ``inner`` calibrated so that a sample lasts at least
``Config.min_sample_s``), the order flipping from round to round, and a row's ratio is the median over rounds of the
per-round ratio. Slow drifts (another process, frequency scaling) hit both sides of a round alike and cancel out;
absolute times are reported for context only.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Config:
    """How hard to measure. ``quick`` shrinks sizes and repeats for the smoke test (numbers then mean little)."""

    quick: bool = False
    rounds: int = 31
    warmup: int = 3
    min_sample_s: float = 5e-3
    clock: Literal["wall", "cpu"] = "wall"

    @classmethod
    def make(cls, quick: bool, rounds: int | None = None, clock: Literal["wall", "cpu"] = "wall") -> Config:
        if quick:
            return cls(quick=True, rounds=rounds or 2, warmup=1, min_sample_s=0.0, clock=clock)
        return cls(quick=False, rounds=rounds or 31, clock=clock)

    def timer(self) -> Callable[[], float]:
        """``time.perf_counter`` (wall), or ``time.process_time`` (CPU seconds of this process: robust to other
        processes competing for the cores when torch runs one thread, but blind to time spent waiting)."""
        return time.perf_counter if self.clock == "wall" else time.process_time


@dataclass
class Timing:
    """Median seconds per call of each contender, and the per-round samples they came from."""

    median: dict[str, float]
    samples: dict[str, list[float]]
    inner: dict[str, int]

    def ratio(self, ours: str, ref: str) -> float:
        """Median over rounds of ``ours / ref`` (each round timed both side by side)."""
        return statistics.median(a / b for a, b in zip(self.samples[ours], self.samples[ref], strict=True))

    def spread(self, ours: str, ref: str) -> tuple[float, float]:
        """Interquartile range of the per-round ratios (how noisy the measurement was)."""
        ratios = sorted(a / b for a, b in zip(self.samples[ours], self.samples[ref], strict=True))
        if len(ratios) < 4:
            return ratios[0], ratios[-1]
        q = statistics.quantiles(ratios, n=4)
        return q[0], q[2]


def interleaved(fns: Mapping[str, Callable[[], Any]], cfg: Config) -> Timing:
    """Time ``fns`` side by side in alternating rounds; see the module docstring.

    Args:
        fns: Contenders by name; each call does one unit of work.
        cfg: Rounds, warm-up and minimum sample duration (each contender's calls per sample are calibrated from one
            timed call so that a sample lasts at least ``cfg.min_sample_s``).

    Returns:
        The medians and the per-round samples (seconds per call).
    """
    names = list(fns)
    for _ in range(cfg.warmup):
        for name in names:
            fns[name]()
    inner: dict[str, int] = {}
    for name in names:
        best = math.inf
        for _ in range(3 if cfg.min_sample_s > 0 else 0):
            t0 = time.perf_counter()
            fns[name]()
            best = min(best, time.perf_counter() - t0)
        inner[name] = max(1, math.ceil(cfg.min_sample_s / max(best, 1e-7))) if math.isfinite(best) else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = cfg.timer()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                fn, n = fns[name], inner[name]
                t0 = clock()
                for _ in range(n):
                    fn()
                samples[name].append((clock() - t0) / n)
    finally:
        if was_enabled:
            gc.enable()
    return Timing({n: statistics.median(s) for n, s in samples.items()}, samples, inner)


Status = Literal["PASS", "MISS", "info", "quick", "ERROR"]


@dataclass
class Result:
    """One line of the table: ``value`` (usually ours/reference) against ``goal`` (``value <= goal`` passes)."""

    row: str
    case: str
    compared: str
    value: float
    goal: float | None
    unit: str = "x"
    context: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    goal_note: str = ""
    quick: bool = False  # measured with --quick: tiny sizes, no verdict

    @property
    def status(self) -> Status:
        if not math.isfinite(self.value):
            return "ERROR"
        if self.goal is None:
            return "info"
        if self.quick:
            return "quick"
        return "PASS" if self.value <= self.goal else "MISS"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status
        return out


def fmt_value(value: float, unit: str) -> str:
    """Render a row's value with its unit (``x`` ratio, ``%``, ``us``, ``B``...)."""
    if not math.isfinite(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "bool":
        return "yes" if value else "no"
    if unit in {"ulp", "rel"}:
        return f"{value:.3g} {unit}"
    return f"{value:.3g} {unit}"


def fmt_goal(res: Result) -> str:
    """Render a row's goal (``<= goal``), or its note when the row is informational."""
    if res.goal is None:
        return res.goal_note or "(context)"
    text = f"<= {fmt_value(res.goal, res.unit)}"
    return f"{text} ({res.goal_note})" if res.goal_note else text


def us(seconds: float) -> str:
    """Seconds as a short human string in µs/ms/s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def mib(nbytes: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{nbytes / 2**20:.2f} MiB"
