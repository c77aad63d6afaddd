"""The class-conditional latent denoiser: a residual MLP on the flattened latents, and its LightningModule.

:class:`LatentDenoiser` is a :class:`~lightning_ldm.latent.LatentDiffusionMixin` module: the trained autoencoder
(:class:`~examples.latent_digits.autoencoder.DigitAutoencoder`) is its frozen first stage with ``scale_by_std`` (the
latents are scaled by ``1/std`` of the first training batch's latents, as CompVis' ``LatentDiffusion``); the class
label is its condition under CompVis' ``"adm"`` key (``apply_model`` calls ``self.model(x, t, y=label)``), dropped to
the null class ``NUM_CLASSES`` with probability ``p_uncond`` during training (what classifier-free guidance needs);
it trains with :meth:`~lightning_ldm.latent.LatentDiffusionMixin.diffusion_loss` and samples with DDIM and
guidance through :meth:`~lightning_ldm.latent.LatentDiffusionMixin.sample`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from examples.latent_digits.autoencoder import DigitAutoencoder
from examples.latent_digits.data import NUM_CLASSES
from lightning_ldm import ScheduleName, SinusoidalTimestepEmbedding, zero_module
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.parameterization import LossWeighting, Parameterization

__all__ = ["LatentDenoiser", "LatentMLP"]


class _Block(nn.Module):
    """``h + W₂·SiLU(W₁·LayerNorm(h) + E·emb)``: a residual MLP block with an additive embedding."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.inner = nn.Linear(hidden, 2 * hidden)
        self.embedding = nn.Linear(hidden, 2 * hidden)
        self.outer = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.outer(self.inner(self.norm(h)) + self.embedding(emb))


class LatentMLP(nn.Module):
    """Residual MLP ``(z_t, t, class) → prediction`` on latents of any shape (flattened inside).

    Args:
        latent_shape: Shape of one latent, e.g. ``(2, 4, 4)``.
        hidden: Width of the hidden layers.
        depth: Number of residual blocks.
        num_classes: Number of classes; index ``num_classes`` is the null class (no condition).
        dropout: Dropout inside the blocks.
    """

    def __init__(
        self, latent_shape: tuple[int, ...], hidden: int = 256, depth: int = 3, num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        features = math.prod(self.latent_shape)
        self.time_embedding = nn.Sequential(
            SinusoidalTimestepEmbedding(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.class_embedding = nn.Embedding(num_classes + 1, hidden)
        self.input = nn.Linear(features, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, dropout) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), zero_module(nn.Linear(hidden, features)))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Predict from noisy latents ``x`` ``(B, *latent_shape)``, timesteps ``t`` ``(B,)`` and classes ``y`` ``(B,)``.

        ``y`` is CompVis' name of the class condition (``conditioning_key="adm"``); ``NUM_CLASSES`` is the null class.
        """
        emb = nn.functional.silu(self.time_embedding(t) + self.class_embedding(y))
        h = self.input(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.output(h).view_as(x)


class LatentDenoiser(LatentDiffusionMixin, L.LightningModule):
    """Class-conditional latent diffusion on the digits' autoencoder latents.

    Args:
        first_stage: The trained autoencoder (registered as the frozen first stage, ``scale_by_std=True``).
        hidden: Width of the denoiser MLP.
        depth: Residual blocks of the denoiser MLP.
        dropout: Dropout inside the blocks.
        beta_schedule: Noise schedule name (``"linear"``, ``"cosine"``, ...).
        timesteps: Training timesteps T.
        parameterization: ``"eps"``, ``"v"`` or ``"x0"``.
        p_uncond: Probability that a training sample's class is replaced by the null class.
        loss_weighting: ``"none"``, ``"min_snr"`` or ``"vlb"`` (``diffusion_loss``'s ``loss_weighting``).
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to 0 at ``trainer.max_steps``).
        weight_decay: AdamW weight decay.
        warmup_steps: Warm-up steps.

    Raises:
        ValueError: ``p_uncond`` is outside ``[0, 1)``.
    """

    #: Index of the null class (no condition): the class embedding has ``NUM_CLASSES + 1`` rows.
    null_class: int = NUM_CLASSES

    def __init__(
        self,
        first_stage: DigitAutoencoder,
        hidden: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        beta_schedule: ScheduleName = "cosine",
        timesteps: int = 1000,
        parameterization: Parameterization = "v",
        p_uncond: float = 0.1,
        loss_weighting: LossWeighting = "none",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond!r}")
        self.save_hyperparameters(ignore=["first_stage"])
        self.register_schedule(beta_schedule=beta_schedule, timesteps=timesteps, parameterization=parameterization)
        self.register_first_stage(first_stage, scale_by_std=True)
        self.register_conditioning(
            "adm", dropout=p_uncond, null={"c_crossattn": torch.tensor(self.null_class, dtype=torch.long)}
        )
        self.latent_shape = (first_stage.latent_channels, 4, 4)
        self.model = LatentMLP(self.latent_shape, hidden=hidden, depth=depth, dropout=dropout)

    def null_labels(self, labels: Tensor) -> Tensor:
        """The null class, shaped and placed like ``labels``: the unconditional condition of guidance."""
        return torch.full_like(labels, self.null_class)

    # --------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.diffusion_loss(images, labels, loss_weighting=self.hparams["loss_weighting"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        total = max(int(self.trainer.max_steps), 1)
        warmup = min(int(self.hparams["warmup_steps"]), total - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_classes(
        self,
        labels: Tensor,
        *,
        guidance_scale: float = 1.0,
        num_steps: int = 50,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM samples of the classes ``labels`` ``(B,)``, decoded: images ``(B, 1, 8, 8)`` in ``[−1, 1]``.

        Args:
            labels: Classes to sample, on any device.
            guidance_scale: Classifier-free guidance scale (1: the conditional model alone).
            num_steps: DDIM steps.
            generator: Generator of the starting noise.

        Returns:
            Decoded samples on the CPU, float32.
        """
        labels = labels.to(self.device)
        images = self.sample(
            (labels.shape[0], *self.latent_shape),
            cond=labels,
            uncond=self.null_labels(labels),
            guidance_scale=guidance_scale,
            num_steps=num_steps,
            generator=generator,
        )
        return images.float().cpu()
