"""The research harness of the latent-digits example: the judges, the timers, the tables, the plots, the summary.

``train.py`` is the template (data, models, Trainer, callbacks); this module measures what it trained:

- class accuracy of guided samples, by the SVC judge (:mod:`examples.latent_digits.classifier`), against its
  accuracy on the held-out real digits (the ceiling);
- the spread of the samples around their class means, against that of real digits;
- FID and KID of the samples against the held-out real digits (``fid_and_kid``, torchmetrics' maths) on the
  penultimate layer of a CNN trained on real digits (:mod:`examples.latent_digits.feature_net`), beside the same
  numbers for as many real training digits that CNN never saw (the floor: what a perfect model of the digits would
  score, sampling noise included).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import Namespace
from torch import Tensor, nn

from examples.latent_digits.classifier import DigitClassifier
from examples.latent_digits.data import NUM_CLASSES, DigitsSplit
from examples.latent_digits.denoiser import LatentDenoiser
from examples.latent_digits.feature_net import floor_indices
from lightning_ldm.callbacks.sample_quality import fid_and_kid
from lightning_ldm.media import image_grid, to_uint8, write_png

log = logging.getLogger("examples.latent_digits")

__all__ = [
    "Clock",
    "EvalOptions",
    "class_spread",
    "evaluate",
    "fitted_quality",
    "format_table",
    "judge_autoencoder",
    "plot_accuracy",
    "real_quality",
    "save_grid",
    "write_summary",
]


@dataclass
class EvalOptions:
    """What to sample and how to judge it.

    Args:
        samples_per_class: Samples of each class at each guidance scale; also the real training digits of each class
            in the FID floor, which the feature net does not train on (so it changes the features too).
        ddim_steps: DDIM steps.
        guidance_scales: Classifier-free guidance scales (1: the conditional model alone).
        sample_seed: Seed of the starting noise (the same noise at every scale) and of the floor's real digits (so of
            the feature net's training digits too).
        classifier_c: ``C`` of the judge's SVC.
    """

    samples_per_class: int = 50
    ddim_steps: int = 50
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0])
    sample_seed: int = 1234
    classifier_c: float = 10.0


class Clock:
    """Wall and process-CPU seconds of named phases (CPU time counts every thread of this process)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = now[0] - self._start[0]
        self.cpu[name] = now[1] - self._start[1]
        self._start = now


def save_grid(path: Path, images: Tensor, nrow: int, scale: int = 4) -> Path:
    """Write images ``(N, 1, H, W)`` in ``[−1, 1]`` as one PNG grid of rows of ``nrow``, upscaled ``scale`` times."""
    grid = image_grid(to_uint8(images), nrow=nrow, padding=1, pad_value=64)
    return write_png(path, grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2))


def class_spread(images: Tensor, labels: Tensor) -> float:
    """Mean distance (in pixels of ``[−1, 1]``) of each image to the mean image of its class: a measure of variety."""
    flat = images.reshape(images.shape[0], -1).float()
    means = torch.stack([flat[labels == c].mean(dim=0) for c in range(NUM_CLASSES)])
    return float((flat - means[labels]).norm(dim=1).mean())


def _features(features: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return features(images.float())


def judge_autoencoder(first_stage: nn.Module, judge: DigitClassifier, split: DigitsSplit, loaded: bool) -> dict:
    """Held-out reconstruction MSE of the autoencoder and the judge's accuracy on the reconstructions (logged)."""
    with torch.no_grad():
        reconstructions = first_stage.decode(first_stage.encode(split.holdout_images))  # type: ignore[operator]
    mse = float(torch.nn.functional.mse_loss(reconstructions, split.holdout_images))
    accuracy = judge.accuracy(reconstructions, split.holdout_labels)
    log.info(
        "autoencoder %s: held-out reconstruction MSE %.4f, judge accuracy on reconstructions %.1f %%",
        "loaded" if loaded else "trained", mse, 100.0 * accuracy,
    )  # fmt: skip
    return {"loaded": loaded, "holdout_reconstruction_mse": mse, "judge_accuracy_on_reconstructions": accuracy}


def real_quality(split: DigitsSplit, features: nn.Module, floor: Tensor, seed: int) -> dict[str, float]:
    """FID/KID of the real training digits ``split.train_images[floor]`` against the held-out ones, on ``features``.

    The floor of the samples' FID: ``floor`` (:func:`~examples.latent_digits.feature_net.floor_indices`) holds as
    many digits as the evaluation samples, with the same class balance, so the same small-sample bias.
    """
    reference = _features(features, split.holdout_images)
    return fid_and_kid(reference, _features(features, split.train_images[floor]), seed=seed)


def fitted_quality(
    split: DigitsSplit, features: nn.Module, trained_on: Tensor, per_class: int, seed: int, draws: int = 5
) -> dict[str, Any]:
    """FID against the held-out digits of real digits the feature net *was* trained on: why the floor's are not.

    ``draws`` subsets of ``per_class`` digits of each class (fewer when a class has fewer) among ``trained_on`` (a
    mask over ``split.train_images``), drawn with seeds ``0 … draws − 1``; FID/KID with ``seed``.

    Returns:
        ``{"fid_of_fitted_digits": mean FID, "fid_of_fitted_digits_draws": [FID of each draw], "fitted_per_class"}``.
    """
    labels = split.train_labels[trained_on]
    available = int(torch.bincount(labels, minlength=NUM_CLASSES).min())
    if available < per_class:
        log.warning(
            "fid_of_fitted_digits draws %d digits per class (the fewest the feature net trained on), not %d as the "
            "floor: their FIDs have different small-sample biases", available, per_class,
        )  # fmt: skip
        per_class = available
    positions = torch.nonzero(trained_on).flatten()
    fids = [
        real_quality(split, features, positions[floor_indices(labels, per_class, draw)], seed)["fid"]
        for draw in range(draws)
    ]
    return {
        "fid_of_fitted_digits": float(np.mean(fids)), "fid_of_fitted_digits_draws": fids, "fitted_per_class": per_class
    }  # fmt: skip


def evaluate(
    model: LatentDenoiser,
    judge: DigitClassifier,
    features: nn.Module,
    options: EvalOptions,
    run_dir: Path,
    split: DigitsSplit,
) -> dict[str, dict[str, Any]]:
    """Sample every class at every guidance scale; judge the samples; write one grid per scale and ``samples.npz``.

    ``spread`` is the :func:`class_spread` of the samples over that of the held-out real digits: 1 when the samples
    vary around their class mean as much as real digits do, less when guidance makes them more uniform. ``fid`` and
    ``kid_mean``/``kid_std`` compare the samples with the held-out digits on ``features``.

    Returns:
        ``{str(scale): {"accuracy", "per_class" (10 floats), "spread", "fid", "kid_mean", "kid_std"}}``.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(options.samples_per_class)
    reference_spread = class_spread(split.holdout_images, split.holdout_labels)
    reference_features = _features(features, split.holdout_images)
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {"labels": labels.numpy()}
    for scale in options.guidance_scales:
        generator = torch.Generator().manual_seed(options.sample_seed)
        images = model.sample_classes(labels, guidance_scale=scale, num_steps=options.ddim_steps, generator=generator)
        correct = judge.predict(images) == labels.numpy()
        results[f"{scale:g}"] = {
            "accuracy": float(correct.mean()),
            "per_class": [float(v) for v in correct.reshape(NUM_CLASSES, -1).mean(axis=1)],
            "spread": class_spread(images, labels) / reference_spread,
            **fid_and_kid(reference_features, _features(features, images), seed=options.sample_seed),
        }
        shown = min(10, options.samples_per_class)
        grid = images.reshape(NUM_CLASSES, options.samples_per_class, 1, 8, 8)[:, :shown].reshape(-1, 1, 8, 8)
        save_grid(run_dir / f"samples_scale{scale:g}.png", grid, nrow=shown)
        arrays[f"scale{scale:g}"] = images.numpy()
    np.savez_compressed(run_dir / "samples.npz", **arrays)  # type: ignore[arg-type]
    return results


def format_table(results: dict[str, dict[str, Any]], ceiling: float, real: dict[str, float]) -> str:
    """The table: one row per guidance scale, then the real digits (accuracy ceiling, FID/KID floor)."""
    lines = [
        "| guidance scale | class accuracy | spread vs real | FID | FID / floor | KID |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {scale} | {100.0 * r['accuracy']:.1f} % | {r['spread']:.2f} | {r['fid']:.3g} "
        f"| {r['fid'] / real['fid']:.2f} | {r['kid_mean']:.4g} ± {r['kid_std']:.3g} |"
        for scale, r in results.items()
    ]
    lines.append(
        f"| real digits (held-out accuracy: ceiling; training vs held-out FID/KID: floor) | {100.0 * ceiling:.1f} % "
        f"| 1.00 | {real['fid']:.3g} | 1 | {real['kid_mean']:.4g} ± {real['kid_std']:.3g} |"
    )
    return "\n".join(lines)


def plot_accuracy(path: Path, accuracy: dict[str, float], ceiling: float) -> Path:
    """Accuracy against guidance scale, with the held-out ceiling as a dashed line; write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [float(s) for s in accuracy]
    figure, axes = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    axes.plot(scales, [100.0 * v for v in accuracy.values()], "o-", label="guided samples")
    axes.axhline(100.0 * ceiling, color="grey", linestyle="--", label="real held-out digits")
    axes.set_xlabel("guidance scale")
    axes.set_ylabel("class accuracy (%)")
    axes.set_xticks(scales)
    axes.set_ylim(min(50.0, *(100.0 * v - 5 for v in accuracy.values())), 100.5)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_summary(run_dir: Path, results: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write ``summary.json``, ``accuracy.md`` and ``accuracy.png``; print the table; return the summary.

    Args:
        run_dir: Output folder.
        results: :func:`evaluate`'s results.
        extra: ``ceiling`` (judge on held-out digits), ``real`` (:func:`real_quality`), ``clock`` (:class:`Clock`)
            and the other entries of the summary (written as they are, through :func:`jsonable`).
    """
    ceiling, real, clock = extra.pop("ceiling"), extra.pop("real"), extra.pop("clock")
    accuracy = {scale: r["accuracy"] for scale, r in results.items()}
    figure = plot_accuracy(run_dir / "accuracy.png", accuracy, ceiling)
    table = format_table(results, ceiling, real)
    clock.lap("outputs")
    summary: dict[str, Any] = {
        "accuracy": accuracy,
        "real_holdout_accuracy": ceiling,
        "per_class_accuracy": {scale: r["per_class"] for scale, r in results.items()},
        "spread": {scale: r["spread"] for scale, r in results.items()},
        "fid": {scale: r["fid"] for scale, r in results.items()},
        "kid": {scale: {"mean": r["kid_mean"], "std": r["kid_std"]} for scale, r in results.items()},
        "real_fid": real["fid"],
        "real_kid": {"mean": real["kid_mean"], "std": real["kid_std"]},
        **{key: jsonable(value) for key, value in extra.items()},
        "wall_seconds": {**clock.wall, "total": sum(clock.wall.values())},
        "cpu_seconds": {**clock.cpu, "total": sum(clock.cpu.values())},
        "torch_threads": torch.get_num_threads(),
    }
    summary["files"] = {**summary.get("files", {}), "figure": str(figure)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "accuracy.md").write_text(table + "\n")
    print(table)
    print(f"wall seconds: {json.dumps({k: round(v, 1) for k, v in summary['wall_seconds'].items()})}")
    print(f"outputs in {run_dir}")
    return summary


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data (a jsonargparse ``Namespace`` as a dict without its ``config`` entries)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if k != "__path__" and k != "config"}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
