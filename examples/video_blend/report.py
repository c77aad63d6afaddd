"""What the example hands back: the motion measure, the GIF of samples, the training figure and the summary.

Nothing here trains; every function takes tensors or logged numbers and writes a file or returns numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from lightning_ldm.media import frame_strip, to_uint8

__all__ = [
    "centres_of_mass",
    "motion_stats",
    "plot_training",
    "read_metrics",
    "write_frame_strip",
    "write_summary",
]


# ------------------------------------------------------------------------------------------------------------- motion
def centres_of_mass(clips: Tensor, floor: float = 0.1) -> tuple[Tensor, Tensor]:
    """Centre and area of the bright shape in every frame.

    The weight of a pixel is its coverage by the shape, ``(max over channels + 1) / 2`` clamped to ``[0, 1]`` for
    frames in ``[-1, 1]`` with a background of −1; weights below ``floor`` count as background, so a faintly
    grey background does not pull the centre towards the middle of the frame.

    Args:
        clips: ``(N, T, C, H, W)`` frames in ``[-1, 1]``.
        floor: Weights below this are set to 0.

    Returns:
        ``(centres, area)``: ``(N, T, 2)`` centre (row, column) in pixels and ``(N, T)`` summed weight, the area of
        the shape in pixels.
    """
    weight = ((clips.float().amax(dim=2) + 1.0) / 2.0).clamp(0.0, 1.0)  # (N, T, H, W)
    weight = torch.where(weight >= floor, weight, torch.zeros_like(weight))
    area = weight.sum(dim=(-1, -2))
    rows = torch.arange(clips.shape[-2], dtype=torch.float32) + 0.5
    cols = torch.arange(clips.shape[-1], dtype=torch.float32) + 0.5
    safe = area.clamp(min=1e-6)
    centre_row = (weight.sum(dim=-1) * rows).sum(dim=-1) / safe
    centre_col = (weight.sum(dim=-2) * cols).sum(dim=-1) / safe
    return torch.stack([centre_row, centre_col], dim=-1), area


def motion_stats(
    clips: Tensor, tolerance: float = 0.75, area_range: tuple[float, float] = (0.02, 0.25)
) -> dict[str, float]:
    """Numbers that tell one object moving at constant velocity from frames drawn independently of each other.

    A frame *holds a shape* when the bright area (see :func:`centres_of_mass`) is a plausible single shape: between
    ``area_range[0]`` and ``area_range[1]`` of the frame (the data's shapes cover 5-12 %; pure noise covers ~40 %).

    * ``velocity_consistency``: share of frame triples ``(k, k+1, k+2)`` that hold a shape in all three frames and
      whose speed along each axis changes by at most ``tolerance`` pixels from one displacement to the next (a
      bounce flips the sign, not the speed). A rigid shape moving at constant velocity scores 1; shapes that jump
      about, vanish or dissolve into noise score low.
    * ``shape_frames``: share of frames that hold a shape.
    * ``mean_speed``: mean displacement of the centre between consecutive frames that both hold a shape (pixels).
    * ``area_variation``: mean over clips of std/mean of the bright area across frames (0 for one rigid object).
    * ``frame_correlation``: mean Pearson correlation of consecutive frames.

    Args:
        clips: ``(N, T, C, H, W)`` frames in ``[-1, 1]``, ``T >= 3``.
        tolerance: Largest change of per-axis speed, in pixels, that still counts as constant velocity.
        area_range: Bright area, as fractions of the frame, of a frame that holds a shape.

    Returns:
        The five numbers above as floats (``mean_speed`` is NaN when no two consecutive frames hold a shape).

    Raises:
        ValueError: ``clips`` is not 5-D or has fewer than 3 frames.
    """
    if clips.ndim != 5 or clips.shape[1] < 3:
        raise ValueError(f"clips must have shape (N, T >= 3, C, H, W), got {tuple(clips.shape)}")
    centres, mass = centres_of_mass(clips)
    pixels = clips.shape[-1] * clips.shape[-2]
    present = (mass >= area_range[0] * pixels) & (mass <= area_range[1] * pixels)
    velocity = centres[:, 1:] - centres[:, :-1]  # (N, T-1, 2)
    speed_change = (velocity[:, 1:].abs() - velocity[:, :-1].abs()).abs().amax(dim=-1)  # (N, T-2)
    valid = present[:, :-2] & present[:, 1:-1] & present[:, 2:]
    consistent = (speed_change <= tolerance) & valid
    pairs = present[:, :-1] & present[:, 1:]
    flat = clips.float().flatten(2)  # (N, T, C·H·W)
    flat = flat - flat.mean(dim=-1, keepdim=True)
    norms = flat.norm(dim=-1).clamp(min=1e-6)
    correlation = (flat[:, 1:] * flat[:, :-1]).sum(dim=-1) / (norms[:, 1:] * norms[:, :-1])
    area_cv = mass.std(dim=1) / mass.mean(dim=1).clamp(min=1e-6)
    return {
        "velocity_consistency": float(consistent.float().mean()),
        "shape_frames": float(present.float().mean()),
        "mean_speed": float(velocity.norm(dim=-1)[pairs].mean()) if pairs.any() else math.nan,
        "area_variation": float(area_cv.mean()),
        "frame_correlation": float(correlation.mean()),
    }


def write_frame_strip(path: Path, rows: Mapping[str, Tensor], *, clips_per_row: int = 3) -> Path:
    """Write a PNG with every frame of a few clips side by side (a still version of the GIF for documents).

    Each label gets one panel: :func:`lightning_ldm.media.frame_strip` of its first clips (one row per clip, frames
    left to right), labelled on the left, frame indices on top.

    Args:
        path: Output file.
        rows: Label → ``(N, T, C, H, W)`` clips in ``[-1, 1]``.
        clips_per_row: Clips shown per label.

    Returns:
        ``path``.
    """
    first = next(iter(rows.values()))
    frames, width = first.shape[1], first.shape[-1]
    clips_per_row = min([clips_per_row, *(clips.shape[0] for clips in rows.values())])
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * frames + 1.2, 0.9 * clips_per_row * len(rows)), squeeze=False)
    for i, (ax, (label, clips)) in enumerate(zip(axes[:, 0], rows.items(), strict=True)):
        strip = frame_strip(to_uint8(clips[:clips_per_row]), padding=1, pad_value=96)  # (C, rows, columns) uint8
        ax.imshow(strip.expand(3, -1, -1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([1 + k * (width + 1) + (width - 1) / 2 for k in range(frames)], [] if i else range(frames))
        ax.xaxis.set_ticks_position("top")
        ax.tick_params(length=0, labelsize=7)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.95, bottom=0.01, hspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------ metrics
def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Read a ``CSVLogger`` ``metrics.csv`` into ``{column: [(step, value), ...]}``, skipping empty cells.

    Args:
        csv_path: The logger's ``metrics.csv``.

    Returns:
        Every logged column except ``step`` and ``epoch``; an empty dict when the file does not exist.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return series
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if window <= 1 or array.size < window:
        return array
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, array[0]), array])
    return np.convolve(padded, kernel, mode="valid")


def _bucket_columns(series: Mapping[str, Any]) -> list[str]:
    """Columns of the per-timestep-bucket training loss, ordered by bucket."""
    columns = [k for k in series if "bucket" in k.lower() and "loss" in k.lower()]

    def key(name: str) -> tuple[int, str]:
        digits = "".join(ch if ch.isdigit() else " " for ch in name).split()
        return (int(digits[0]) if digits else 0, name)

    return sorted(columns, key=key)


def plot_training(
    path: Path,
    metrics: Mapping[str, Mapping[str, list[tuple[int, float]]]],
    val_by_t: Mapping[str, Mapping[int, float]],
) -> Path:
    """Write the four-panel training figure.

    Panels: training loss against step (smoothed) for every model; the training loss by timestep bucket as logged
    by ``TimestepLossMonitor`` (last value of each bucket); the validation loss at the fixed timestep grid; each learned
    blender's α over training as logged by ``AlphaBlenderMonitor``.

    Args:
        path: Output PNG.
        metrics: Model name → :func:`read_metrics` output.
        val_by_t: Model name → {timestep: validation loss}.

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_loss, ax_bucket, ax_val, ax_alpha = axes.ravel()
    colours = dict(zip(metrics, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))

    for name, series in metrics.items():
        points = series.get("train/loss", [])
        if points:
            steps, values = zip(*points, strict=True)
            ax_loss.plot(steps, values, color=colours[name], alpha=0.25, linewidth=0.8)
            ax_loss.plot(steps, _smooth(values, 5), color=colours[name], label=name)
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss", yscale="log")
    ax_loss.legend()

    width = 0.8 / max(len(metrics), 1)
    drew_buckets = False
    for i, (name, series) in enumerate(metrics.items()):
        columns = _bucket_columns(series)
        if not columns:
            continue
        drew_buckets = True
        last = [series[c][-1][1] for c in columns]
        ax_bucket.bar(np.arange(len(columns)) + i * width, last, width=width, color=colours[name], label=name)
        labels = [column.split("/")[-1] for column in columns]
        ax_bucket.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, labels, rotation=45, fontsize=7)
    ax_bucket.set(
        title="training loss by timestep bucket (last logged window)",
        xlabel="timesteps of the bucket",
        ylabel="loss",
        yscale="log",
    )
    if drew_buckets:
        ax_bucket.legend()
    else:
        ax_bucket.text(0.5, 0.5, "no bucket metrics logged", ha="center", transform=ax_bucket.transAxes)

    for name, losses in val_by_t.items():
        ts = sorted(losses)
        ax_val.plot(ts, [losses[t] for t in ts], marker="o", color=colours.get(name), label=name)
    ax_val.set(
        title="validation loss on video clips (fixed t, fixed noise)", xlabel="timestep t", ylabel="loss", yscale="log"
    )
    ax_val.legend()

    drew_alpha = False
    for name, series in metrics.items():
        for column in sorted(k for k in series if "alpha" in k.lower()):
            steps, values = zip(*series[column], strict=True)
            if name != next(iter(metrics)) and all(v == 1.0 for v in values):
                continue  # fixed α = 1 blenders of the baseline: one flat line says it all
            short = column.split("/")[-1]
            ax_alpha.plot(steps, values, label=f"{name}: {short}")
            drew_alpha = True
    ax_alpha.set(
        title=r"blender $\alpha$ over training ($\alpha$ weights the spatial path)",
        xlabel="step",
        ylabel=r"$\alpha$",
        ylim=(0.0, 1.05),
    )
    if drew_alpha:
        ax_alpha.legend(fontsize=7)
    else:
        ax_alpha.text(0.5, 0.5, r"no $\alpha$ metrics logged", ha="center", transform=ax_alpha.transAxes)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------ summary
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` (everything) and ``summary.txt`` (the headline numbers, side by side).

    Args:
        run_dir: The run's folder.
        summary: The numbers collected by ``train.py`` (see its ``_summarise``).

    Returns:
        The two paths.
    """
    json_path = run_dir / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=False))

    models = summary["models"]
    names = list(models)
    lines = ["video-blend example: AlphaBlender-mixed spatial/temporal denoiser vs spatial-only baseline", ""]
    lines.append(f"{'':34}" + "".join(f"{n:>16}" for n in names) + f"{'training clips':>16}")
    rows = [
        ("validation loss (video, fixed t)", "val_loss", None),
        ("train loss (last 50 steps)", "train_loss_end", None),
        ("velocity consistency of samples", "motion", "velocity_consistency"),
        ("frames holding one shape", "motion", "shape_frames"),
        ("mean speed (px/frame)", "motion", "mean_speed"),
        ("area variation (std/mean)", "motion", "area_variation"),
        ("consecutive-frame correlation", "motion", "frame_correlation"),
        ("training wall time (s)", "train_seconds", None),
        ("training CPU time (s)", "train_cpu_seconds", None),
        ("steps", "steps", None),
    ]
    for title, key, sub in rows:
        cells = []
        for name in names:
            value = models[name].get(key)
            if sub is not None and isinstance(value, Mapping):
                value = value.get(sub)
            cells.append(_fmt(value) if value is not None else "-")
        reference = summary.get("data_motion", {}).get(sub, None) if sub else None
        cells.append(_fmt(reference) if reference is not None else "")
        lines.append(f"{title:34}" + "".join(f"{c:>16}" for c in cells))
    lines.append("")
    for key, value in summary.get("comparison", {}).items():
        lines.append(f"{key}: {_fmt(value)}")
    lines.append("")
    lines.append("wall times (s): " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.get("wall_seconds", {}).items()))
    for name in names:
        alphas = models[name].get("alphas", {})
        if alphas:
            lines.append(f"final alpha ({name}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in alphas.items()))
    text_path = run_dir / "summary.txt"
    text_path.write_text("\n".join(lines) + "\n")
    return json_path, text_path
