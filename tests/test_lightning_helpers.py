"""The shared Lightning test helpers: make_trainer's quiet, deterministic CPU defaults and their overrides."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar

from tests.lightning_helpers import TRAINER_DEFAULTS, make_trainer


def test_make_trainer_defaults():
    torch.use_deterministic_algorithms(False)
    trainer = make_trainer()
    assert isinstance(trainer, L.Trainer)
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 1 and trainer.world_size == 1
    assert trainer.logger is None and trainer.loggers == []
    assert trainer.checkpoint_callback is None
    assert not any(isinstance(cb, (ModelCheckpoint, ProgressBar, ModelSummary)) for cb in trainer.callbacks)
    assert trainer.num_sanity_val_steps == 0 and trainer.max_steps == 4
    assert torch.are_deterministic_algorithms_enabled()  # conftest puts the process-wide flag back after the test


def test_make_trainer_overrides(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = make_trainer(max_steps=7, enable_checkpointing=True, callbacks=[ckpt], deterministic=False)
    assert trainer.max_steps == 7 and trainer.checkpoint_callback is ckpt
    assert not torch.are_deterministic_algorithms_enabled()
    assert TRAINER_DEFAULTS["max_steps"] == 4 and TRAINER_DEFAULTS["deterministic"] is True  # not mutated
