"""Tiny models, data and a recording logger for the Lightning-layer tests (DiffusionSeedCallback and friends).

Kept importable (``tests.lightning_helpers``) so that DDP-spawned processes and LightningCLI can find the classes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.compat import CompVisCompat
from lightning_ldm.mixin import DiffusionMixin


class TinyNet(nn.Module):
    """``model(x_t, t)`` for (B, dim) samples: a two-layer MLP with a learned timestep embedding."""

    def __init__(self, dim: int = 8, hidden: int = 32, timesteps: int = 20) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.Embedding(timesteps, hidden)
        self.block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.out(self.block(self.inp(x) + self.emb(t)))


class TinyDenoiser(DiffusionMixin, L.LightningModule):
    """A DiffusionMixin module that records ``(t, per-sample loss)`` of every training batch in ``self.recorded``."""

    denoiser_name = "net"

    def __init__(
        self,
        timesteps: int = 20,
        dim: int = 8,
        lr: float = 1e-2,
        beta_schedule: str = "linear",
        parameterization: str = "eps",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_schedule(beta_schedule=beta_schedule, timesteps=timesteps, parameterization=parameterization)
        torch.manual_seed(1234)
        self.net = TinyNet(dim=dim, timesteps=timesteps)
        self.recorded: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        loss = self.diffusion_loss(x)
        assert self.last_timestep_losses is not None
        t, losses = self.last_timestep_losses
        self.recorded.append((t.detach().cpu().clone(), losses.detach().cpu().clone()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(batch[0])
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class CompVisTinyDenoiser(CompVisCompat, TinyDenoiser):
    """``TinyDenoiser`` with CompVis' names: the schedule tables as attributes, CompVis state dicts with tables load."""


def make_loader(n: int = 32, dim: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, dim, generator=g)), batch_size=batch_size, shuffle=False)


#: The Trainer every Lightning test starts from: one CPU process, deterministic algorithms, nothing written (no logger,
#: no checkpoints) and nothing printed (no progress bar, no model summary), no sanity validation, 4 steps. Tests pass
#: what they need on top (``make_trainer(max_steps=8, callbacks=[...])``); LightningCLI tests pass it as
#: ``trainer_defaults``. ``conftest.py`` restores torch's deterministic-algorithms flag after each test, since
#: ``deterministic=True`` sets it process-wide.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "deterministic": True,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "max_steps": 4,
}


def make_trainer(**overrides: Any) -> L.Trainer:
    """A ``L.Trainer`` with ``TRAINER_DEFAULTS``, each overridden by the keyword of the same name.

    Without a ``default_root_dir`` the Trainer writes (files of callbacks without a logger, checkpoints) under a fresh
    temporary folder, never into the working directory.
    """
    options = {**TRAINER_DEFAULTS, **overrides}
    options.setdefault("default_root_dir", tempfile.mkdtemp(prefix="lightning_ldm_test_"))
    return L.Trainer(**options)


def run_spawned(run: Callable[[L.Trainer], Any], **overrides: Any) -> L.Trainer:
    """``run(make_trainer(strategy="ddp_spawn", devices=2, **overrides))``, once more if a rank aborts at its exit.

    On this 2-core machine under load, torch's teardown of a finished gloo process occasionally aborts it
    ("terminate called without an active exception", SIGABRT) after its work and files are complete. Only that
    signal is retried, once, with a new Trainer (the module in this process is untouched by a spawned run); every
    other failure, and a second abort, is raised.
    """
    for attempt in range(2):
        trainer = make_trainer(strategy="ddp_spawn", devices=2, **overrides)
        try:
            run(trainer)
            return trainer
        except mp.ProcessExitedException as err:
            if getattr(err, "signal_name", None) != "SIGABRT" or attempt == 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class RecordingLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call as ``(metrics, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every record holding ``key``."""
        return [(step, float(m[key])) for m, step in self.records if key in m]


class RankRecorder(TinyDenoiser):
    """Saves, at train end, this rank's recorded ``(t, loss)``, weights, sampler state and logged metrics to
    ``{out_dir}/rank{global_rank}.pt`` (for DDP tests, where each process has its own copy of the module)."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_train_end(self) -> None:
        from lightning_ldm.callbacks import DiffusionSeedCallback

        schedule_cb = next(cb for cb in self.trainer.callbacks if isinstance(cb, DiffusionSeedCallback))  # type: ignore[attr-defined]
        torch.save(
            {
                "recorded": self.recorded,
                "params": [p.detach().clone() for p in self.parameters()],
                "sampler": schedule_cb.sampler.state_dict(),
                "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
                "world_size": self.trainer.world_size,
            },
            f"{self.out_dir}/rank{self.global_rank}.pt",
        )


class TinyDataModule(L.LightningDataModule):
    """``make_loader`` as a DataModule (for LightningCLI)."""

    def __init__(self, n: int = 32, dim: int = 8, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.dim, self.batch_size = n, dim, batch_size

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.n, self.dim, self.batch_size)
