"""LightningCLI builds a DiffusionMixin model and the lightning_ldm callbacks from a YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_ldm.callbacks import (
    AlphaBlenderMonitor,
    DiffusionSeedCallback,
    GradientCheckpointing,
    TimestepLossMonitor,
)
from lightning_ldm.timestep_samplers import LogitNormalSampler
from tests.lightning_helpers import TRAINER_DEFAULTS, TinyDataModule, TinyDenoiser

CONFIG = """
seed_everything: 123
trainer:
  max_steps: 2
  callbacks:
    - class_path: lightning_ldm.callbacks.DiffusionSeedCallback
      init_args:
        timestep_sampler:
          class_path: lightning_ldm.timestep_samplers.LogitNormalSampler
          init_args:
            mean: 0.5
    - class_path: lightning_ldm.callbacks.TimestepLossMonitor
      init_args:
        num_buckets: 5
    - class_path: lightning_ldm.callbacks.GradientCheckpointing
      init_args:
        modules: [net.block]
    - class_path: lightning_ldm.callbacks.AlphaBlenderMonitor
      init_args:
        logging_interval: epoch
data:
  batch_size: 4
model:
  timesteps: 30
  beta_schedule: cosine
  parameterization: v
"""


SAMPLER_BLOCK = """timestep_sampler:
          class_path: lightning_ldm.timestep_samplers.LogitNormalSampler
          init_args:
            mean: 0.5
"""
assert SAMPLER_BLOCK in CONFIG


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _cli(args: list[str], **kwargs: Any) -> LightningCLI:
    """LightningCLI over the tiny model and data, on the suite's quiet CPU Trainer (the YAML overrides it)."""
    return LightningCLI(TinyDenoiser, TinyDataModule, args=args, trainer_defaults=TRAINER_DEFAULTS, **kwargs)


def test_cli_builds_model_and_callbacks(tmp_path: Path) -> None:
    cli = _cli(["--config", _write(tmp_path, CONFIG)], run=False)
    assert cli.trainer.max_steps == 2 and cli.trainer.logger is None  # the YAML over TRAINER_DEFAULTS
    model = cli.model
    assert isinstance(model, TinyDenoiser)
    assert model.noise_schedule.num_timesteps == 30 and model.noise_schedule.parameterization == "v"
    assert model.noise_schedule.fingerprint["beta_schedule"] == "cosine"
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    schedule = callbacks[DiffusionSeedCallback]
    assert isinstance(schedule, DiffusionSeedCallback)
    assert isinstance(schedule.sampler, LogitNormalSampler) and schedule.sampler.mean == 0.5
    assert schedule.seed is None
    assert callbacks[TimestepLossMonitor].num_buckets == 5  # type: ignore[attr-defined]
    assert callbacks[GradientCheckpointing].modules == ("net.block",)  # type: ignore[attr-defined]
    assert callbacks[AlphaBlenderMonitor].logging_interval == "epoch"  # type: ignore[attr-defined]


def test_cli_fit_runs_with_the_callbacks(tmp_path: Path) -> None:
    cli = _cli(
        ["fit", "--config", _write(tmp_path, CONFIG), "--trainer.default_root_dir", str(tmp_path)],
        save_config_callback=None,
    )
    schedule = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DiffusionSeedCallback))
    assert cli.trainer.global_step == 2 and schedule.batch_counter == 2
    assert schedule.resolved_seed == 123  # seed_everything of the config, through PL_GLOBAL_SEED
    assert any(name.startswith("loss_bucket/") for name in cli.trainer.callback_metrics)
    t, _ = cli.model.recorded[0]  # type: ignore[union-attr]
    assert len(cli.model.recorded) == 2 and t.dtype == torch.long and t.shape == (4,)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("num_buckets: 5", "num_buckets: 0", "num_buckets=0 is out of range"),
        ("mean: 0.5", "std: -1.0", "std=-1 is out of range"),
        ("modules: [net.block]", "modules: []", "modules is empty"),
    ],
)
def test_cli_refuses_bad_callback_config(tmp_path: Path, old: str, new: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cli(["--config", _write(tmp_path, CONFIG.replace(old, new))], run=False)


def test_cli_refuses_unknown_sampler_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli(["--config", _write(tmp_path, CONFIG.replace(SAMPLER_BLOCK, "timestep_sampler: bogus\n"))], run=False)
    assert "timestep_sampler" in capsys.readouterr().err
