"""The cost of one ``SampleQualityMonitor`` evaluation, in training steps of the same model, measured side by side.

One evaluation = sampling ``M`` latents with DDIM (``num_steps`` steps, one batch) + the default feature extractor
(``RandomConvFeatures``) on them + torchmetrics' FID and KID against the cached reference features. One training
step = ``training_step`` (``DiffusionMixin.diffusion_loss``), backward and an AdamW step on a batch. Both run on the
same ``LitDenoiser`` after a one-step ``fit`` has set the monitor up (reference features cached), in alternating
rounds; the row reports the median per-round ratio evaluation / training step: evaluating every ``N`` steps slows
training by about ``ratio / N``. A second row isolates the metric (features of ``M`` samples + FID/KID) from the
sampling, whose cost scales with ``M × num_steps`` forwards.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import Config, Result, interleaved, us
from benchmarks._models import LitDenoiser
from lightning_ldm.callbacks import SampleQualityMonitor
from lightning_ldm.callbacks.sample_quality import fid_and_kid
from lightning_ldm.features import RandomConvFeatures

# (training batch, latent size, width, blocks, samples M, DDIM steps, reference images N)
CASE = (8, 16, 64, 3, 64, 20, 256)
QUICK_CASE = (2, 8, 16, 1, 4, 2, 8)
ROUNDS = 7


class SamplingDenoiser(LitDenoiser):
    """``LitDenoiser`` whose ``forward`` is its network (what ``ddim_sample`` calls through ``apply_model``)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


def run(cfg: Config) -> list[Result]:
    batch, size, width, blocks, samples, steps, references = QUICK_CASE if cfg.quick else CASE
    rounds = cfg.rounds if cfg.quick else min(cfg.rounds, ROUNDS)
    torch.manual_seed(0)
    lit = SamplingDenoiser(width=width, blocks=blocks)
    data = torch.randn(4 * batch, 4, size, size)
    reference = torch.randn(references, 4, size, size)
    monitor = SampleQualityMonitor(
        (samples, 4, size, size), reference, every_n_steps=1, sample_kwargs={"num_steps": steps}
    )
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[monitor],
    )  # fmt: skip
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(lit, DataLoader(TensorDataset(data), batch_size=batch))  # sets up and caches the reference
    finally:
        lightning_log.setLevel(level)
    optimizer = trainer.optimizers[0]
    x = data[:batch]
    real = monitor.reference_features(trainer, lit)
    fake = monitor.sample_features(trainer, lit)

    def train_step() -> None:
        lit.train()
        optimizer.zero_grad(set_to_none=True)
        lit.training_step([x], 0).backward()
        optimizer.step()

    def evaluation() -> None:
        monitor.compute(monitor.sample_features(trainer, lit))

    extractor = RandomConvFeatures(4)  # the monitor's default for 4-channel references
    fake_images = torch.randn(samples, 4, size, size)

    def metric() -> None:
        with torch.no_grad():
            fid_and_kid(real, extractor(fake_images))

    fns = {"train_step": train_step, "evaluation": evaluation, "metric": metric}
    timing = interleaved(fns, replace(cfg, rounds=rounds))
    med = timing.median
    case = (
        f"ConvDenoiser width {width}, {blocks} blocks; training batch ({batch}, 4, {size}, {size}); evaluation: "
        f"M={samples} samples, {steps} DDIM steps, N={references} reference images, RandomConvFeatures(4) "
        f"({fake.shape[1]} features)"
    )
    ctx = (
        f"per call: training step {us(med['train_step'])}, evaluation {us(med['evaluation'])}, features + FID/KID "
        f"{us(med['metric'])}"
    )
    extra = {"median_s": med, "samples_s": timing.samples, "reference_features": list(real.shape)}
    note = "context: evaluating every N steps costs about ratio / N of the training time"
    return [
        Result(
            "quality evaluation",
            case,
            "one evaluation / one training step",
            timing.ratio("evaluation", "train_step"),
            None,
            context=ctx,
            extra=extra,
            goal_note=note,
            quick=cfg.quick,
        ),
        Result(
            "quality evaluation",
            f"{case}: features + FID/KID only",
            "features + FID/KID / one training step",
            timing.ratio("metric", "train_step"),
            None,
            context=ctx,
            extra=extra,
            goal_note="context: the part that does not grow with the DDIM steps",
            quick=cfg.quick,
        ),
    ]
