"""The first stage: a small convolutional variational autoencoder, 1×8×8 digits ↔ C×4×4 latents.

As CompVis' ``AutoencoderKL`` (in miniature): the encoder gives the mean and log-variance of a diagonal Gaussian
posterior, training minimises ``MSE(x, decode(z)) + kl_weight·KL(q(z|x) ‖ N(0, I))`` with ``z`` drawn from the
posterior, and the latent diffusion model encodes with the posterior mean. A tiny ``kl_weight`` keeps the latents
bounded and smooth without costing reconstruction quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["DigitAutoencoder", "load_or_train_autoencoder"]


class DigitAutoencoder(L.LightningModule):
    """Convolutional VAE for ``(B, 1, 8, 8)`` images in ``[−1, 1]``; latents ``(B, latent_channels, 4, 4)``.

    Args:
        latent_channels: Channels of the 4×4 latent.
        width: Channels of the hidden layers.
        kl_weight: Weight of the KL term.
        lr: AdamW learning rate.
    """

    def __init__(self, latent_channels: int = 2, width: int = 32, kl_weight: float = 1e-6, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.latent_channels = latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),  # 8×8 → 4×4
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),  # 4×4 → 8×8
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (clamped to ``[−30, 20]`` as CompVis) of ``q(z | x)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean: the latent the diffusion model learns."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Images in ``[−1, 1]`` (``tanh`` of the decoder output)."""
        return torch.tanh(self.decoder(z))

    def _losses(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        reconstruction = F.mse_loss(self.decode(z), x)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return reconstruction, kl

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        reconstruction, kl = self._losses(batch[0])
        loss = reconstruction + self.hparams["kl_weight"] * kl
        self.log_dict({"ae/reconstruction": reconstruction, "ae/kl": kl}, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=0.0)
        steps = int(self.trainer.estimated_stepping_batches)  # max_steps, or what max_epochs amounts to
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams["lr"], total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_or_train_autoencoder(
    path: Path,
    make_trainer: Any,
    datamodule: L.LightningDataModule,
    saved_hparams: dict[str, Any],
    **hparams: Any,
) -> tuple[DigitAutoencoder, bool]:
    """Load the autoencoder saved at ``path`` when it was made with ``saved_hparams``, else train it and save it.

    Args:
        path: File of the saved weights and ``saved_hparams`` (``torch.save`` of a dict).
        make_trainer: Zero-argument callable returning the ``Trainer`` that trains the autoencoder.
        datamodule: The digits.
        saved_hparams: What identifies the trained weights (the model's arguments, steps, seed, ...).
        **hparams: Arguments of :class:`DigitAutoencoder`.

    Returns:
        ``(autoencoder in eval mode with frozen parameters, whether it was loaded)``.
    """
    model = DigitAutoencoder(**hparams)
    loaded = False
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("hparams") == saved_hparams:
            model.load_state_dict(saved["state_dict"])
            loaded = True
    if not loaded:
        make_trainer().fit(model, datamodule=datamodule)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"hparams": saved_hparams, "state_dict": model.state_dict()}, path)
    model.eval().requires_grad_(False)
    return model, loaded
