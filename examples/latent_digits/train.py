"""Latent diffusion on 8x8 digits, end to end: ``python -m examples.latent_digits.train --config <config.yaml>``.

A template: split the digits, train the autoencoder (reused from ``<run_dir>/autoencoder.pt`` when it matches), train
a small CNN whose penultimate layer is the FID/KID features, train the denoiser with the package's callbacks
(``SampleLogger`` grids and the ``SampleQualityMonitor`` FID curve go to TensorBoard), then let
:mod:`examples.latent_digits.report` (the harness) judge samples at each guidance scale.
Override any option on the command line (``--train.steps 500``; ``--help`` lists them).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from examples.latent_digits import report
from examples.latent_digits.autoencoder import DigitAutoencoder, load_or_train_autoencoder
from examples.latent_digits.classifier import DigitClassifier
from examples.latent_digits.data import NUM_CLASSES, DigitsDataModule
from examples.latent_digits.denoiser import LatentDenoiser
from examples.latent_digits.feature_net import (
    DigitFeatureNet,
    check_feature_digits,
    floor_indices,
    save_feature_net,
    train_feature_net,
)
from lightning_ldm.callbacks import DiffusionSeedCallback, SampleLogger, SampleQualityMonitor, TimestepLossMonitor

log = logging.getLogger("examples.latent_digits")


@dataclass
class TrainOptions:
    """How to train: the models, the callbacks (``grid_*``: ``SampleLogger``; ``quality_*``: ``SampleQualityMonitor``).

    Args:
        batch_size: Batch size of the autoencoder, the feature net and the denoiser.
        holdout_fraction: Fraction of each class held out (never trained on; the FID reference).
        autoencoder_steps: Training steps of the autoencoder (reused from ``<run_dir>/autoencoder.pt`` when its
            settings, seed and training digits match).
        feature_steps: Training steps of the feature net (the FID/KID features).
        feature_seed: Seed of the feature net's weights and batches (``None``: the run's ``--seed``); another value
            gives another judge of the same samples.
        steps: Training steps of the denoiser.
        ema_decay: Decay of ``EMAWeightAveraging``.
        ema_start: First step the EMA updates at; keep it below ``steps`` (else sampling uses the initial weights).
        grid_every_n_steps: Steps between two ``SampleLogger`` grids.
        grid_per_class: Samples of each class in a grid (a row per class).
        grid_guidance_scale: Guidance scale of the grids.
        grid_ddim_steps: DDIM steps of the grids.
        quality_every_n_steps: Steps between two ``SampleQualityMonitor`` evaluations.
        quality_per_class: Samples of each class in an evaluation.
        quality_guidance_scale: Guidance scale of the evaluations.
        quality_ddim_steps: DDIM steps of the evaluations.
        log_every_n_steps: The Trainer's ``log_every_n_steps``.
        bucket_loss_every_n_steps: Steps between two ``TimestepLossMonitor`` logs.
        progress_bar: Show Lightning's progress bar.
    """

    batch_size: int = 128
    holdout_fraction: float = 0.2
    autoencoder_steps: int = 1200
    feature_steps: int = 400
    feature_seed: int | None = None
    steps: int = 2000
    ema_decay: float = 0.999
    ema_start: int = 100
    grid_every_n_steps: int = 500
    grid_per_class: int = 8
    grid_guidance_scale: float = 3.0
    grid_ddim_steps: int = 20
    quality_every_n_steps: int = 250
    quality_per_class: int = 50
    quality_guidance_scale: float = 1.0
    quality_ddim_steps: int = 20
    log_every_n_steps: int = 10
    bucket_loss_every_n_steps: int = 100
    progress_bar: bool = False


def build_parser() -> ArgumentParser:
    """The command line: ``--config``, ``--seed``, ``--run_dir``, ``--torch_threads`` and the options' groups."""
    parser = ArgumentParser(description="Class-conditional latent diffusion on scikit-learn's 8x8 digits.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything (split, weights, draws).")
    parser.add_argument("--run_dir", type=str | None, default=None, help="Default: runs/latent_digits/seed<seed>.")
    parser.add_argument(
        "--torch_threads", type=int | None, default=None, help="torch.set_num_threads (None or 0: torch's default)."
    )
    parser.add_class_arguments(DigitAutoencoder, "autoencoder")
    parser.add_class_arguments(DigitFeatureNet, "features")
    parser.add_class_arguments(LatentDenoiser, "model", skip={"first_stage"})
    parser.add_class_arguments(TrainOptions, "train")
    parser.add_class_arguments(report.EvalOptions, "eval")
    return parser


def _trainer(steps: int, options: TrainOptions, loggers: list[Logger], callbacks: list[Any]) -> Trainer:
    return Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks, deterministic=True,
        enable_checkpointing=False, enable_progress_bar=options.progress_bar, enable_model_summary=False,
        log_every_n_steps=options.log_every_n_steps,
    )  # fmt: skip


def _tensorboard(run_dir: Path, version: str) -> TensorBoardLogger:
    """A TensorBoard logger of ``<run_dir>/tensorboard/<version>``, emptied first (a rerun replaces its curves)."""
    shutil.rmtree(run_dir / "tensorboard" / version, ignore_errors=True)
    return TensorBoardLogger(run_dir, name="tensorboard", version=version, default_hp_metric=False)


def _fingerprint(images: torch.Tensor) -> str:
    """A short hash of ``images``: a saved autoencoder is reused only for the very digits it was trained on."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; return the summary (also written to ``<run_dir>/summary.json``)."""
    clock = report.Clock()
    # the frozen first stage stays in eval mode on purpose; Lightning warns about every such module at fit start
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    config = build_parser().parse_args(args)
    if config.torch_threads:
        torch.set_num_threads(int(config.torch_threads))
    run_dir = Path(config.run_dir or f"runs/latent_digits/seed{config.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    train, options = TrainOptions(**config.train), report.EvalOptions(**config.eval)
    seed_everything(config.seed, workers=True, verbose=False)
    data = DigitsDataModule(batch_size=train.batch_size, holdout_fraction=train.holdout_fraction, seed=config.seed)
    split = data.split
    # the real training digits of the FID floor, and the others: what the feature net trains on (see feature_net.py)
    floor = floor_indices(split.train_labels, options.samples_per_class, options.sample_seed)
    feature_digits = torch.ones(len(split.train_labels), dtype=torch.bool).index_fill_(0, floor, False)
    check_feature_digits(split.train_labels[feature_digits], options.samples_per_class)
    clock.lap("setup")

    judge = DigitClassifier(c=options.classifier_c).fit(split.train_images, split.train_labels)
    ceiling = judge.accuracy(split.holdout_images, split.holdout_labels)
    log.info("judge: %.1f %% on the %d held-out real digits", 100.0 * ceiling, len(split.holdout_labels))
    clock.lap("classifier")

    first_stage, loaded = load_or_train_autoencoder(
        run_dir / "autoencoder.pt",
        lambda: _trainer(train.autoencoder_steps, train, [_tensorboard(run_dir, "autoencoder")], []),
        data,
        saved_hparams={
            **dict(config.autoencoder),
            "steps": train.autoencoder_steps,
            "seed": config.seed,
            "batch_size": train.batch_size,
            "training_digits": _fingerprint(split.train_images),
        },
        **dict(config.autoencoder),
    )
    autoencoder = report.judge_autoencoder(first_stage, judge, split, loaded)
    clock.lap("autoencoder")

    feature_seed = config.seed if train.feature_seed is None else train.feature_seed
    seed_everything(feature_seed, workers=True, verbose=False)
    feature_net = train_feature_net(
        _trainer(train.feature_steps, train, [_tensorboard(run_dir, "features")], []),
        split.train_images[feature_digits], split.train_labels[feature_digits], train.batch_size, feature_seed,
        **dict(config.features),
    )  # fmt: skip
    save_feature_net(feature_net, run_dir / "feature_net.pt")  # load_feature_net: judge other samples the same way
    features = feature_net.body
    feature_accuracy = feature_net.accuracy(split.holdout_images, split.holdout_labels)
    log.info("feature net: %.1f %% on the held-out digits", 100.0 * feature_accuracy)
    clock.lap("features")

    seed_everything(config.seed, workers=True, verbose=False)  # same denoiser whether the autoencoder was loaded
    model = LatentDenoiser(first_stage, **dict(config.model))
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(train.grid_per_class)  # a row per class
    sampling = {"num_steps": train.grid_ddim_steps, "guidance_scale": train.grid_guidance_scale}
    quality_labels = torch.arange(NUM_CLASSES).repeat_interleave(train.quality_per_class)
    quality_sampling = {"num_steps": train.quality_ddim_steps, "guidance_scale": train.quality_guidance_scale}
    callbacks = [
        DiffusionSeedCallback(seed=config.seed),
        EMAWeightAveraging(decay=train.ema_decay, update_starting_at_step=train.ema_start),
        TimestepLossMonitor(log_every_n_steps=train.bucket_loss_every_n_steps),
        # after the EMA callback: grids and FIDs judge the EMA weights, that step's update included
        SampleLogger(
            (grid_labels.shape[0], *model.latent_shape), every_n_steps=train.grid_every_n_steps,
            at_validation_end=False, cond=grid_labels, uncond=model.null_labels(grid_labels),
            seed=options.sample_seed, nrow=train.grid_per_class, sample_kwargs=sampling,
        ),
        SampleQualityMonitor(
            (quality_labels.shape[0], *model.latent_shape), split.holdout_images,
            every_n_steps=train.quality_every_n_steps, at_validation_end=False, features=features,
            cond=quality_labels, uncond=model.null_labels(quality_labels), seed=options.sample_seed,
            sample_kwargs=quality_sampling,
        ),
    ]  # fmt: skip
    # the CSV logger comes first: its folder <run_dir>/denoiser/ gets metrics.csv and the grids' PNG files
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="denoiser"), _tensorboard(run_dir, "denoiser")]
    trainer = _trainer(train.steps, train, loggers, callbacks)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(run_dir / "denoiser.ckpt", weights_only=True)  # the EMA weights, first stage included
    clock.lap("denoiser")

    results = report.evaluate(model, judge, features, options, run_dir, split)
    real = report.real_quality(split, features, floor, options.sample_seed)
    fitted = report.fitted_quality(split, features, feature_digits, options.samples_per_class, options.sample_seed)
    clock.lap("sampling")
    return report.write_summary(
        run_dir, results, ceiling=ceiling, real=real, clock=clock,
        autoencoder=autoencoder,
        feature_net={
            "holdout_accuracy": feature_accuracy, "training_digits": int(feature_digits.sum()), "seed": feature_seed,
            **fitted,
        },
        scale_factor=model.first_stage.scale, steps=int(trainer.global_step),
        files={"tensorboard": str(run_dir / "tensorboard"), "grids": str(run_dir / "denoiser" / "samples")},
        config=config,
    )  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    main()
