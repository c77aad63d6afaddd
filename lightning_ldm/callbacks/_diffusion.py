"""Checks and helpers shared by the callbacks that drive a :class:`~lightning_ldm.mixin.DiffusionMixin` module."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ldm.mixin import DiffusionMixin

__all__ = ["diffusion_module", "gather_ranked", "gather_rows", "logger_directory", "schedule_timesteps"]


def diffusion_module(pl_module: pl.LightningModule, owner: str) -> DiffusionMixin:
    """Return ``pl_module`` typed as a :class:`~lightning_ldm.mixin.DiffusionMixin`.

    Args:
        pl_module: The Trainer's module.
        owner: Name of the calling callback, for the message.

    Returns:
        The same object.

    Raises:
        TypeError: ``pl_module`` does not mix in ``DiffusionMixin``.
    """
    if not isinstance(pl_module, DiffusionMixin):
        raise TypeError(
            f"{owner} needs a LightningModule that mixes in DiffusionMixin "
            f"(class M(DiffusionMixin, L.LightningModule)), got {type(pl_module).__name__}"
        )
    return pl_module


def schedule_timesteps(module: DiffusionMixin, owner: str) -> int:
    """Number of training timesteps ``T`` of the module's registered schedule.

    Args:
        module: A ``DiffusionMixin`` module.
        owner: Name of the calling callback, for the message.

    Returns:
        ``module.noise_schedule.num_timesteps``.

    Raises:
        RuntimeError: No schedule is registered.
    """
    if module.noise_schedule is None:
        raise RuntimeError(
            f"{type(module).__name__} has no noise schedule; call self.register_schedule(...) in __init__ "
            f"(or in setup/configure_model) before fitting with {owner}"
        )
    return module.noise_schedule.num_timesteps


def gather_rows(trainer: pl.Trainer, rows: Tensor) -> Tensor:
    """All ranks' ``rows`` ``(n_r, ...)`` concatenated in rank order (every rank gets the result; sizes may differ).

    Two all-gathers (the sizes, then the rows padded to the largest size); a no-op in a single process.
    """
    if trainer.world_size <= 1:
        return rows
    strategy = trainer.strategy
    sizes = strategy.all_gather(torch.tensor([rows.shape[0]], device=rows.device)).reshape(-1).tolist()
    width = max(int(size) for size in sizes)
    if width == 0:  # no rank has rows (all ranks agree: the sizes are gathered)
        return rows
    pad = [0, 0] * (rows.ndim - 1) + [0, width - rows.shape[0]]
    gathered = strategy.all_gather(torch.nn.functional.pad(rows, pad))
    return torch.cat([gathered[rank, : int(size)] for rank, size in enumerate(sizes)])


def gather_ranked(trainer: pl.Trainer, t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(t, losses)`` concatenated in rank order, 1-D (see :func:`gather_rows`)."""
    return gather_rows(trainer, t.reshape(-1).long()), gather_rows(trainer, losses.reshape(-1).float())


def logger_directory(logger: object) -> str | None:
    """The local directory a logger writes to (``log_dir``, else ``save_dir``), or ``None`` when it has none."""
    for attribute in ("log_dir", "save_dir"):
        directory = getattr(logger, attribute, None)
        if isinstance(directory, str | os.PathLike):
            return os.fspath(directory)
    return None
