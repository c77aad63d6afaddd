"""Checks and helpers shared by the callbacks that drive a :class:`~lightning_ldm.mixin.DiffusionMixin` module."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ldm.mixin import DiffusionMixin

__all__ = ["diffusion_module", "gather_ranked", "schedule_timesteps"]


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


def gather_ranked(trainer: pl.Trainer, t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(t, losses)`` concatenated in rank order (every rank gets the same result; sizes may differ).

    Three small all-gathers (sizes, padded ``t``, padded losses); a no-op in a single process.

    Args:
        trainer: The Trainer (its strategy gathers).
        t: This rank's timesteps, any shape.
        losses: This rank's per-sample losses, as many entries as ``t``.

    Returns:
        ``(t, losses)`` of all ranks, 1-D, rank 0's first.
    """
    if trainer.world_size <= 1:
        return t, losses
    strategy = trainer.strategy
    t = t.reshape(-1).long()
    losses = losses.reshape(-1).float()
    sizes = strategy.all_gather(torch.tensor([t.numel()], device=t.device)).reshape(-1)
    width = int(sizes.max())
    if width == 0:  # no rank has losses this step (all ranks agree: sizes are gathered)
        return t, losses
    pad = width - t.numel()
    t_all = strategy.all_gather(torch.nn.functional.pad(t, (0, pad))).reshape(-1, width)
    l_all = strategy.all_gather(torch.nn.functional.pad(losses, (0, pad))).reshape(-1, width)
    keep = torch.arange(width, device=sizes.device)[None, :] < sizes[:, None]
    return t_all[keep], l_all[keep]
