"""A small latent denoiser shared by the training-step, DDIM and resume rows."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from lightning_ldm.compat import CompVisCompat
from lightning_ldm.embedding import timestep_embedding
from lightning_ldm.mixin import DiffusionMixin


class ConvDenoiser(nn.Module):
    """``eps(x_t, t)``: conv stem, residual GroupNorm-SiLU-conv blocks with a timestep embedding, conv head."""

    def __init__(self, in_channels: int = 4, width: int = 64, blocks: int = 3, emb_dim: int = 128) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.emb = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(blocks)
        )
        self.head = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.stem(x) + self.emb(timestep_embedding(t, self.emb_dim))[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class LitDenoiser(DiffusionMixin, L.LightningModule):
    """The same network trained through ``DiffusionMixin.diffusion_loss`` (eps target, plain L2)."""

    denoiser_name = "net"

    def __init__(self, width: int = 64, blocks: int = 3, timesteps: int = 1000, lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_schedule(beta_schedule="linear", timesteps=timesteps, linear_start=0.00085, linear_end=0.012)
        self.net = ConvDenoiser(width=width, blocks=blocks)
        self.lr = lr

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr)


class CompVisLitDenoiser(CompVisCompat, LitDenoiser):
    """``LitDenoiser`` with CompVis' names: loads CompVis state dicts that carry the schedule tables."""
