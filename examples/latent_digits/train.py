"""Train the latent-digits example end to end, then measure the class accuracy of guided samples.

One command (what ``make example-latent`` runs)::

    python -m examples.latent_digits.train --config examples/latent_digits/config.yaml

Every option can be overridden on the command line, e.g. ``--train.steps 500``, ``--model.parameterization eps``,
``--eval.guidance_scales [1,3]``, ``--run_dir runs/mine`` (``--help`` lists them all).

What happens:

1. The digits are split, stratified, into a training and a held-out part; an SVC (the judge) is fitted on the
   training part and scored on the held-out part: the ceiling of the sample accuracy.
2. The autoencoder is trained with Lightning and saved as ``<run_dir>/autoencoder.pt`` (or loaded from there when
   its hyperparameters and steps match).
3. The latent denoiser is trained with ``ScheduleCallback``, ``EMAWeightAveraging``, ``TimestepLossMonitor`` and
   ``SampleLogger``, which samples a grid (a row per class, EMA weights) every N steps and writes it to the TensorBoard
   event file in ``<run_dir>/tensorboard/denoiser/`` and as a PNG to ``<run_dir>/denoiser/samples/`` (the folder of
   the CSV logger, which also holds ``metrics.csv``).
4. With the EMA weights, ``samples_per_class`` digits of each class are sampled with DDIM at each guidance scale and
   labelled by the judge; the accuracy table is printed and written with the plot ``accuracy.png``, the sample grids
   ``samples_scale{s}.png`` and ``summary.json`` (``accuracy`` by guidance scale, ``real_holdout_accuracy``, wall and
   CPU seconds of each phase).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor

from examples.latent_digits.autoencoder import DigitAutoencoder, load_or_train_autoencoder
from examples.latent_digits.classifier import DigitClassifier
from examples.latent_digits.data import NUM_CLASSES, DigitsDataModule
from examples.latent_digits.denoiser import LatentDenoiser
from lightning_ldm.callbacks import SampleLogger, ScheduleCallback, TimestepLossMonitor
from lightning_ldm.media import image_grid, to_uint8, write_png

log = logging.getLogger("examples.latent_digits")


@dataclass
class TrainOptions:
    """How long and how to train.

    Args:
        batch_size: Batch size of both trainings.
        holdout_fraction: Fraction of each class held out from every training.
        autoencoder_steps: Optimizer steps of the autoencoder.
        steps: Optimizer steps of the denoiser.
        ema_decay: EMA decay of the denoiser weights.
        ema_start: First step of the EMA.
        grid_every_n_steps: Interval of the training grids (``SampleLogger``).
        grid_per_class: Samples per class in a training grid.
        grid_guidance_scale: Guidance scale of the training grids.
        grid_ddim_steps: DDIM steps of the training grids.
        log_every_n_steps: Trainer logging interval.
        bucket_loss_every_n_steps: Window of the loss by timestep bucket (``TimestepLossMonitor``).
        progress_bar: Show Lightning's progress bar.
    """

    batch_size: int = 128
    holdout_fraction: float = 0.2
    autoencoder_steps: int = 1200
    steps: int = 2000
    ema_decay: float = 0.999
    ema_start: int = 100
    grid_every_n_steps: int = 500
    grid_per_class: int = 8
    grid_guidance_scale: float = 3.0
    grid_ddim_steps: int = 20
    log_every_n_steps: int = 10
    bucket_loss_every_n_steps: int = 100
    progress_bar: bool = False


@dataclass
class EvalOptions:
    """What to sample and how to judge it.

    Args:
        samples_per_class: Samples of each class at each guidance scale.
        ddim_steps: DDIM steps.
        guidance_scales: Classifier-free guidance scales (1: the conditional model alone).
        sample_seed: Seed of the starting noise (the same noise at every scale).
        classifier_c: ``C`` of the judge's SVC.
    """

    samples_per_class: int = 50
    ddim_steps: int = 50
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0])
    sample_seed: int = 1234
    classifier_c: float = 10.0


class _Clock:
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


def build_parser() -> ArgumentParser:
    """The command line: ``--config``, ``--seed``, ``--run_dir``, ``--torch_threads``, ``--autoencoder.*``,
    ``--model.*`` (the denoiser), ``--train.*`` and ``--eval.*``."""
    parser = ArgumentParser(description="Class-conditional latent diffusion on scikit-learn's 8x8 digits.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything (split, weights, draws).")
    parser.add_argument(
        "--run_dir", type=str | None, default=None, help="Outputs (default runs/latent_digits/seed<seed>)."
    )
    parser.add_argument(
        "--torch_threads",
        type=int | None,
        default=None,
        help="torch.set_num_threads (None or 0: leave torch's default).",
    )
    parser.add_class_arguments(DigitAutoencoder, "autoencoder")
    parser.add_class_arguments(LatentDenoiser, "model", skip={"first_stage"})
    parser.add_class_arguments(TrainOptions, "train")
    parser.add_class_arguments(EvalOptions, "eval")
    return parser


def _trainer(steps: int, options: TrainOptions, loggers: list[Logger], callbacks: list[Any]) -> Trainer:
    return Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=options.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=options.log_every_n_steps,
        deterministic=True,
    )


def _tensorboard(run_dir: Path, version: str) -> TensorBoardLogger:
    return TensorBoardLogger(run_dir, name="tensorboard", version=version, default_hp_metric=False)


def save_grid(path: Path, images: Tensor, nrow: int, scale: int = 4) -> Path:
    """Write images ``(N, 1, H, W)`` in ``[−1, 1]`` as one PNG grid of rows of ``nrow``, upscaled ``scale`` times."""
    grid = image_grid(to_uint8(images), nrow=nrow, padding=1, pad_value=64)
    return write_png(path, grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2))


def class_spread(images: Tensor, labels: Tensor) -> float:
    """Mean distance (in pixels of ``[−1, 1]``) of each image to the mean image of its class: a measure of variety."""
    flat = images.reshape(images.shape[0], -1).float()
    means = torch.stack([flat[labels == c].mean(dim=0) for c in range(NUM_CLASSES)])
    return float((flat - means[labels]).norm(dim=1).mean())


def evaluate(
    model: LatentDenoiser,
    judge: DigitClassifier,
    options: EvalOptions,
    run_dir: Path,
    reference: tuple[Tensor, Tensor],
) -> dict[str, dict[str, Any]]:
    """Sample every class at every guidance scale, label the samples with ``judge``; write one grid per scale.

    ``spread`` is the :func:`class_spread` of the samples over that of the ``reference`` (real) digits: 1 when the
    samples vary around their class mean as much as real digits do, less when guidance makes them more uniform.

    The samples go to ``<run_dir>/samples.npz`` (``labels`` and ``scale{s}``: images ``(N, 1, 8, 8)`` in ``[−1, 1]``).

    Returns:
        ``{str(scale): {"accuracy": float, "per_class": [10 floats], "spread": float}}``.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(options.samples_per_class)
    reference_spread = class_spread(reference[0], reference[1])
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {"labels": labels.numpy()}
    for scale in options.guidance_scales:
        generator = torch.Generator().manual_seed(options.sample_seed)
        images = model.sample_classes(labels, guidance_scale=scale, num_steps=options.ddim_steps, generator=generator)
        correct = judge.predict(images) == labels.numpy()
        per_class = correct.reshape(NUM_CLASSES, -1).mean(axis=1)
        results[f"{scale:g}"] = {
            "accuracy": float(correct.mean()),
            "per_class": [float(v) for v in per_class],
            "spread": class_spread(images, labels) / reference_spread,
        }
        shown = min(10, options.samples_per_class)
        grid = images.reshape(NUM_CLASSES, options.samples_per_class, 1, 8, 8)[:, :shown].reshape(-1, 1, 8, 8)
        save_grid(run_dir / f"samples_scale{scale:g}.png", grid, nrow=shown)
        arrays[f"scale{scale:g}"] = images.numpy()
    np.savez_compressed(run_dir / "samples.npz", **arrays)  # type: ignore[arg-type]
    return results


def format_table(accuracy: dict[str, float], ceiling: float, spread: dict[str, float]) -> str:
    """The accuracy table: one row per guidance scale, then the real held-out digits."""
    lines = ["| guidance scale | class accuracy | spread vs real |", "|---:|---:|---:|"]
    lines += [f"| {scale} | {100.0 * value:.1f} % | {spread[scale]:.2f} |" for scale, value in accuracy.items()]
    lines.append(f"| real held-out digits (ceiling) | {100.0 * ceiling:.1f} % | 1.00 |")
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


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; return the summary (also written to ``<run_dir>/summary.json``).

    Args:
        args: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The summary dictionary.
    """
    clock = _Clock()
    # the frozen first stage stays in eval mode on purpose; Lightning warns about every such module at fit start
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    parser = build_parser()
    config = parser.parse_args(args)
    if config.torch_threads:
        torch.set_num_threads(int(config.torch_threads))
    run_dir = Path(config.run_dir or f"runs/latent_digits/seed{config.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    train, options = TrainOptions(**config.train), EvalOptions(**config.eval)
    seed_everything(config.seed, workers=True, verbose=False)
    data = DigitsDataModule(batch_size=train.batch_size, holdout_fraction=train.holdout_fraction, seed=config.seed)
    clock.lap("setup")

    judge = DigitClassifier(c=options.classifier_c).fit(data.split.train_images, data.split.train_labels)
    ceiling = judge.accuracy(data.split.holdout_images, data.split.holdout_labels)
    log.info("judge: %.1f %% on the %d held-out real digits", 100.0 * ceiling, len(data.split.holdout_labels))
    clock.lap("classifier")

    autoencoder_hparams = {**dict(config.autoencoder), "steps": train.autoencoder_steps, "seed": config.seed}
    first_stage, loaded = load_or_train_autoencoder(
        run_dir / "autoencoder.pt",
        lambda: _trainer(train.autoencoder_steps, train, [_tensorboard(run_dir, "autoencoder")], []),
        data,
        saved_hparams=autoencoder_hparams,
        **dict(config.autoencoder),
    )
    holdout = data.split.holdout_images
    reconstruction = float(torch.nn.functional.mse_loss(first_stage.decode(first_stage.encode(holdout)), holdout))
    reconstruction_accuracy = judge.accuracy(first_stage.decode(first_stage.encode(holdout)), data.split.holdout_labels)
    log.info(
        "autoencoder %s: held-out reconstruction MSE %.4f, judge accuracy on reconstructions %.1f %%",
        "loaded" if loaded else "trained", reconstruction, 100.0 * reconstruction_accuracy,
    )  # fmt: skip
    clock.lap("autoencoder")

    seed_everything(config.seed, workers=True, verbose=False)  # same denoiser whether the autoencoder was loaded
    model = LatentDenoiser(first_stage, **dict(config.model))
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(train.grid_per_class)  # a row per class
    grids = SampleLogger(
        (grid_labels.shape[0], *model.latent_shape),
        every_n_steps=train.grid_every_n_steps,
        at_validation_end=False,
        num_steps=train.grid_ddim_steps,
        guidance_scale=train.grid_guidance_scale,
        cond=grid_labels,
        uncond=model.null_labels(grid_labels),
        seed=options.sample_seed,
        nrow=train.grid_per_class,
    )
    callbacks = [
        ScheduleCallback(seed=config.seed),
        EMAWeightAveraging(decay=train.ema_decay, update_starting_at_step=train.ema_start),
        TimestepLossMonitor(log_every_n_steps=train.bucket_loss_every_n_steps),
        grids,  # after the EMA callback: the grids show the EMA weights, that step's update included
    ]
    # the CSV logger comes first: its folder <run_dir>/denoiser/ gets metrics.csv and the grids' PNG files
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="denoiser"), _tensorboard(run_dir, "denoiser")]
    trainer = _trainer(train.steps, train, loggers, callbacks)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(run_dir / "denoiser.ckpt", weights_only=True)  # the EMA weights, first stage included
    clock.lap("denoiser")

    results = evaluate(model, judge, options, run_dir, (data.split.holdout_images, data.split.holdout_labels))
    accuracy = {scale: result["accuracy"] for scale, result in results.items()}
    clock.lap("sampling")

    table = format_table(accuracy, ceiling, {scale: result["spread"] for scale, result in results.items()})
    figure = plot_accuracy(run_dir / "accuracy.png", accuracy, ceiling)
    clock.lap("outputs")
    summary: dict[str, Any] = {
        "accuracy": accuracy,
        "real_holdout_accuracy": ceiling,
        "per_class_accuracy": {scale: result["per_class"] for scale, result in results.items()},
        "spread": {scale: result["spread"] for scale, result in results.items()},
        "autoencoder": {
            "loaded": loaded,
            "holdout_reconstruction_mse": reconstruction,
            "judge_accuracy_on_reconstructions": reconstruction_accuracy,
        },
        "scale_factor": model.first_stage.scale,
        "steps": int(trainer.global_step),
        "wall_seconds": {**clock.wall, "total": sum(clock.wall.values())},
        "cpu_seconds": {**clock.cpu, "total": sum(clock.cpu.values())},
        "torch_threads": torch.get_num_threads(),
        "files": {
            "figure": str(figure),
            "tensorboard": str(run_dir / "tensorboard"),
            "grids": str(run_dir / "denoiser" / "samples"),
        },
        "config": _jsonable(config),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "accuracy.md").write_text(table + "\n")
    print(table)
    print(f"wall seconds: {json.dumps({k: round(v, 1) for k, v in summary['wall_seconds'].items()})}")
    print(f"outputs in {run_dir}")
    return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if k != "__path__" and k != "config"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    main()
