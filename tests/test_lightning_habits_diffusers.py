"""Issue 15.4 with diffusers: sampling progress with a diffusers scheduler; LightningCLI with diffusers models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DModel
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import tests.test_lightning_habits as habits
from lightning_ldm.latent import LatentDiffusionMixin
from tests.lightning_helpers import TRAINER_DEFAULTS
from tests.test_lightning_habits import T


def test_progress_counts_the_scheduler_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    config = habits.LabelDenoiser().noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    habits.test_progress_counts_the_sampling_steps(monkeypatch, DPMSolverMultistepScheduler.from_config(config))


# ------------------------------------------------------------------------------- LightningCLI with diffusers models
class DiffusersLDM(LatentDiffusionMixin, L.LightningModule):
    """The README's supported pattern: take the diffusers models' configs as dicts and build them in ``__init__``."""

    def __init__(self, vae: dict[str, Any], unet: dict[str, Any], timesteps: int = T) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_schedule(timesteps=timesteps)
        self.register_first_stage(AutoencoderKL.from_config(vae))
        self.model = UNet2DModel.from_config(unet)

    def apply_model(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.model(x_t, t).sample  # diffusers models return an output object

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainable_parameters(), lr=0.01)


class Images(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))), 2)


DIFFUSERS_CONFIG = """
trainer:
  max_steps: 1
model:
  vae:
    block_out_channels: [8, 8]
    down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D]
    up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D]
    norm_num_groups: 4
    latent_channels: 2
  unet:
    sample_size: 4
    in_channels: 2
    out_channels: 2
    block_out_channels: [8, 8]
    down_block_types: [DownBlock2D, DownBlock2D]
    up_block_types: [UpBlock2D, UpBlock2D]
    norm_num_groups: 4
    layers_per_block: 1
"""


def test_lightning_cli_builds_diffusers_models_from_config_dicts(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(DIFFUSERS_CONFIG)
    defaults = {**TRAINER_DEFAULTS, "default_root_dir": str(tmp_path)}
    cli = LightningCLI(
        DiffusersLDM, Images, args=["fit", "--config", str(path)], trainer_defaults=defaults, save_config_callback=None
    )
    model = cli.model
    assert model.first_stage is not None
    assert tuple(model.first_stage.autoencoder.config.block_out_channels) == (8, 8)
    assert tuple(model.model.config.down_block_types) == ("DownBlock2D", "DownBlock2D")
    assert cli.trainer.global_step == 1
    images = model.sample((1, 2, 4, 4), num_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(images, Tensor) and images.shape == (1, 3, 8, 8)
