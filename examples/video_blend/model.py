"""A small spatio-temporal denoiser in the manner of Stable Video Diffusion, and its LightningModule.

Frames travel flattened as ``(B·T, C, H, W)`` through ordinary 2-D layers (the *spatial* path). Each video block adds
a *temporal* path on top and mixes the two with :class:`lightning_ldm.AlphaBlender`:

* :class:`VideoResBlock`: a 2-D residual block, then a residual block whose convolutions have kernel ``(3, 1, 1)``
  over ``(B, C, T, H, W)``; blended with ``rearrange_pattern="b t -> b 1 t 1 1"``.
* :class:`VideoAttentionBlock`: self-attention over the ``H·W`` positions of each frame, then attention over the
  ``T`` frames at each position (with a frame-index embedding); blended on ``(B·T, H·W, C)`` tokens with the default
  ``rearrange_pattern="b t -> (b t) 1 1"``.

With ``merge_strategy="learned_with_images"``, α = σ(mix_factor) weights the spatial output, 1 − α the temporal one,
and frames flagged in ``image_only_indicator`` (still images) take the spatial path only. ``spatial_only=True``
builds the same network with every blender fixed at α = 1: the baseline that never looks across frames.

The blocks are plain modules: gradient checkpointing is the Trainer's business, through
:class:`lightning_ldm.callbacks.GradientCheckpointing` (see ``config.yaml``), which checkpoints chosen block types
during ``fit`` only. Every call into :class:`~lightning_ldm.mixin.DiffusionMixin` is in :class:`VideoDenoiser`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lightning_ldm import (
    AlphaBlender,
    DiffusionMixin,
    ScheduleName,
    SinusoidalTimestepEmbedding,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "SpatialResBlock",
    "TemporalResBlock",
    "VideoAttentionBlock",
    "VideoDenoiser",
    "VideoResBlock",
    "VideoUNet",
]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _make_blender(spatial_only: bool, merge_factor: float, pattern: str) -> AlphaBlender:
    if spatial_only:
        return AlphaBlender(alpha=1.0, merge_strategy="fixed", rearrange_pattern=pattern)
    return AlphaBlender(alpha=merge_factor, merge_strategy="learned_with_images", rearrange_pattern=pattern)


class SpatialResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, plus the timestep embedding, → GroupNorm → SiLU → zero-initialised 3×3 conv.

    Args:
        in_channels: Channels in.
        out_channels: Channels out (a 1×1 convolution matches the skip connection when they differ).
        emb_dim: Width of the timestep embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Map ``(N, C_in, H, W)`` and an embedding ``(N, E)`` to ``(N, C_out, H, W)``."""
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip(x) + self.out_layers(h)


class TemporalResBlock(nn.Module):
    """:class:`SpatialResBlock`'s layout with ``(3, 1, 1)`` convolutions over ``(B, C, T, H, W)``: mixes nearby frames.

    Args:
        channels: Channels in and out.
        emb_dim: Width of the timestep embedding (one per clip).
    """

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        conv = partial(nn.Conv3d, channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), conv())
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, channels))
        self.out_layers = nn.Sequential(_norm(channels), nn.SiLU(), zero_module(conv()))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Map ``(B, C, T, H, W)`` and a per-clip embedding ``(B, E)`` to ``(B, C, T, H, W)``."""
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None, None].to(x.dtype)
        return x + self.out_layers(h)


class VideoResBlock(nn.Module):
    """A spatial residual block, then a temporal one, mixed by an :class:`~lightning_ldm.AlphaBlender` (SVD-style).

    ``out = α·spatial(x) + (1 − α)·temporal(spatial(x))`` with α of shape ``(B, 1, T, 1, 1)``.

    Args:
        in_channels: Channels in.
        out_channels: Channels out.
        emb_dim: Width of the timestep embedding.
        spatial_only: Fix α = 1 (``merge_strategy="fixed"``): the temporal block never contributes.
        merge_factor: Initial mix_factor of the learned blender (α starts at σ(merge_factor)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        spatial_only: bool = False,
        merge_factor: float = 0.5,
    ) -> None:
        super().__init__()
        self.spatial = SpatialResBlock(in_channels, out_channels, emb_dim)
        self.temporal = TemporalResBlock(out_channels, emb_dim)
        self.blender = _make_blender(spatial_only, merge_factor, "b t -> b 1 t 1 1")

    def forward(self, x: Tensor, emb: Tensor, clip_emb: Tensor, image_only_indicator: Tensor) -> Tensor:
        """Map frames ``(B·T, C_in, H, W)`` to ``(B·T, C_out, H, W)``.

        Args:
            x: Frames, flattened over the batch and time.
            emb: Timestep embedding per frame ``(B·T, E)``.
            clip_emb: Timestep embedding per clip ``(B, E)``.
            image_only_indicator: ``(B, T)`` bool, True for still images.
        """
        frames = image_only_indicator.shape[1]
        x = self.spatial(x, emb)
        x_spatial = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
        x_temporal = self.temporal(x_spatial, clip_emb)
        out = self.blender(x_spatial, x_temporal, image_only_indicator=image_only_indicator)
        return rearrange(out, "b c t h w -> (b t) c h w")


class _Attention(nn.Module):
    """Pre-norm multi-head self-attention with a zero-initialised output projection, residual."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, tokens: Tensor) -> Tensor:
        """Attend over dimension 1 of ``(N, L, C)`` tokens."""
        q, k, v = rearrange(self.qkv(self.norm(tokens)), "n l (three h d) -> three n h l d", three=3, h=self.num_heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        return tokens + self.proj(rearrange(attended, "n h l d -> n l (h d)"))


class VideoAttentionBlock(nn.Module):
    """Attention over space, then over time, mixed by an :class:`~lightning_ldm.AlphaBlender` (SVD's video transformer).

    The temporal branch sees a sinusoidal embedding of the frame index (``timestep_embedding`` of 0..T−1), so it knows
    the order of the frames. ``out = α·spatial + (1 − α)·temporal`` on ``(B·T, H·W, C)`` tokens, α of shape
    ``(B·T, 1, 1)``.

    Args:
        channels: Channels in and out.
        num_heads: Attention heads.
        spatial_only: Fix α = 1 (``merge_strategy="fixed"``).
        merge_factor: Initial mix_factor of the learned blender.
    """

    def __init__(self, channels: int, num_heads: int, *, spatial_only: bool = False, merge_factor: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.spatial = _Attention(channels, num_heads)
        self.temporal = _Attention(channels, num_heads)
        self.frame_pos = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.blender = _make_blender(spatial_only, merge_factor, "b t -> (b t) 1 1")

    def forward(self, x: Tensor, image_only_indicator: Tensor) -> Tensor:
        """Map frames ``(B·T, C, H, W)`` to ``(B·T, C, H, W)``."""
        frames = image_only_indicator.shape[1]
        height, width = x.shape[-2:]
        tokens = rearrange(x, "n c h w -> n (h w) c")
        x_spatial = self.spatial(tokens)
        frame_index = torch.arange(frames, device=x.device)
        pos = self.frame_pos(timestep_embedding(frame_index, self.channels).to(x.dtype))  # (T, C)
        x_time = rearrange(x_spatial, "(b t) s c -> (b s) t c", t=frames) + pos
        x_time = rearrange(self.temporal(x_time), "(b s) t c -> (b t) s c", s=height * width)
        out = self.blender(x_spatial, x_time, image_only_indicator=image_only_indicator)
        return rearrange(out, "n (h w) c -> n c h w", h=height, w=width)


class VideoUNet(nn.Module):
    """The denoiser: 2×2 patches in, video blocks at half resolution, pixel shuffle out.

    ``conv_in`` turns each 2×2 patch of a frame into a ``width``-wide feature vector (16×16 frames become 8×8
    grids, which keeps a CPU run short); then a :class:`VideoResBlock`, a :class:`VideoAttentionBlock` and another
    :class:`VideoResBlock` with a skip connection; ``conv_out`` predicts four values per patch that ``pixel_shuffle``
    puts back in place.
    ``forward(x (B, T, C, H, W), t (B,), image_only_indicator (B, T) | None) -> (B, T, C, H, W)``.

    Args:
        in_channels: Channels of the frames.
        width: Channels of the feature maps.
        num_heads: Attention heads.
        spatial_only: Build every blender fixed at α = 1 (the spatial-only baseline).
        merge_factor: Initial mix_factor of the learned blenders.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        num_heads: int = 4,
        *,
        spatial_only: bool = False,
        merge_factor: float = 0.5,
    ) -> None:
        super().__init__()
        emb_dim = 4 * width
        video = partial(VideoResBlock, emb_dim=emb_dim, spatial_only=spatial_only, merge_factor=merge_factor)
        self.time_embed = nn.Sequential(
            SinusoidalTimestepEmbedding(width), nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=2, stride=2)
        self.in_block = video(width, width)
        self.attention = VideoAttentionBlock(width, num_heads, spatial_only=spatial_only, merge_factor=merge_factor)
        self.out_block = video(2 * width, width)
        self.conv_out = nn.Sequential(
            _norm(width), nn.SiLU(), zero_module(nn.Conv2d(width, 4 * in_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, t: Tensor, image_only_indicator: Tensor | None = None) -> Tensor:
        """Predict the model output (ε, x0 or v) for noisy clips ``x`` at timesteps ``t``."""
        batch, frames = x.shape[:2]
        if image_only_indicator is None:
            image_only_indicator = torch.zeros(batch, frames, dtype=torch.bool, device=x.device)
        clip_emb = self.time_embed(t)
        emb = clip_emb.repeat_interleave(frames, dim=0)
        h = self.conv_in(rearrange(x, "b t c h w -> (b t) c h w"))
        skip = self.in_block(h, emb, clip_emb, image_only_indicator)
        h = self.attention(skip, image_only_indicator)
        h = self.out_block(torch.cat([h, skip], dim=1), emb, clip_emb, image_only_indicator)
        out = F.pixel_shuffle(self.conv_out(h), 2)
        return rearrange(out, "(b t) c h w -> b t c h w", t=frames)


class VideoDenoiser(DiffusionMixin, L.LightningModule):
    """The LightningModule: :class:`VideoUNet` trained with :class:`~lightning_ldm.mixin.DiffusionMixin`'s loss.

    Args:
        in_channels: Channels of the frames (linked to ``data.channels`` by the CLI).
        width: Channels of the network's feature maps.
        num_heads: Attention heads.
        spatial_only: Fix every blender at α = 1 (the baseline without temporal mixing).
        merge_factor: Initial mix_factor of the learned blenders (α starts at σ(merge_factor)).
        beta_schedule: Beta schedule name (see ``lightning_ldm.make_beta_schedule``).
        timesteps: Number of diffusion steps.
        linear_start: First beta of the linear schedules.
        linear_end: Last beta of the linear schedules.
        zero_terminal_snr: Rescale the schedule so that the last step is pure noise.
        parameterization: What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        loss_weighting: ``"none"``, ``"min_snr"`` or ``"vlb"`` (see ``DiffusionMixin.diffusion_loss``).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then cosine decay to 10 % over ``trainer.max_steps``.
        eval_timesteps: The fixed timestep grid of the validation loss.
        eval_seed: Seed of the validation noise (the same noise for every model evaluated).
    """

    denoiser_name = "net"  # apply_model (the loss, the samplers) calls self.net

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        num_heads: int = 4,
        spatial_only: bool = False,
        merge_factor: float = 0.5,
        beta_schedule: ScheduleName = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        zero_terminal_snr: bool = False,
        parameterization: Literal["eps", "x0", "v"] = "eps",
        loss_weighting: Literal["none", "min_snr", "vlb"] = "none",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        eval_timesteps: tuple[int, ...] = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950),
        eval_seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_schedule(
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            zero_terminal_snr=zero_terminal_snr,
            parameterization=parameterization,
        )
        bad = [t for t in eval_timesteps if not 0 <= t < timesteps]
        if bad:
            raise ValueError(f"eval_timesteps must lie in [0, {timesteps - 1}], got {bad}")
        self.net = VideoUNet(in_channels, width, num_heads, spatial_only=spatial_only, merge_factor=merge_factor)

    def forward(self, x: Tensor, t: Tensor, image_only_indicator: Tensor | None = None) -> Tensor:
        """The network's prediction for noisy clips ``x`` (B, T, C, H, W) at timesteps ``t`` (B,)."""
        return self.net(x, t, image_only_indicator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One diffusion loss on a batch of clips (one timestep per clip, shared by its frames)."""
        loss = self.diffusion_loss(
            batch["video"],
            {"image_only_indicator": batch["image_only_indicator"]},
            loss_weighting=self.hparams["loss_weighting"],
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Denoising loss at the fixed timestep grid with fixed noise (unweighted, comparable across runs)."""
        self.fixed_timestep_loss(
            batch["video"],
            {"image_only_indicator": batch["image_only_indicator"]},
            timesteps=self.hparams["eval_timesteps"],
            batch_index=batch_idx,
            seed=self.hparams["eval_seed"],
        )

    @torch.no_grad()
    def sample_clips(
        self,
        shape: tuple[int, int, int, int, int],
        *,
        num_steps: int = 50,
        method: Literal["uniform", "quad", "linspace", "trailing"] = "uniform",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM samples of video clips (every frame flagged as video, not as a still image).

        Args:
            shape: ``(N, T, C, H, W)`` of the clips.
            num_steps: DDIM steps.
            method: DDIM timestep spacing.
            eta: DDIM η (0: deterministic).
            generator: Generator of the starting noise (the same seed gives every model the same noise).

        Returns:
            ``(N, T, C, H, W)`` samples on the module's device, in the module's dtype.
        """
        video = torch.zeros(shape[:2], dtype=torch.bool, device=self.device)
        samples = self.sample(
            shape,
            num_steps=num_steps,
            method=method,
            eta=eta,
            generator=generator,
            cond={"image_only_indicator": video},
        )
        if not isinstance(samples, Tensor):  # only with return_intermediates=True, which is not asked for
            raise TypeError(f"sample returned {type(samples).__name__}, expected a tensor")
        return samples

    def configure_optimizers(self) -> Any:
        """AdamW with a linear warm-up and a cosine decay to 10 % of the peak rate over ``trainer.max_steps``."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        warmup = max(int(self.hparams["warmup_steps"]), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total is None:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
