r"""Validation loss on a fixed grid of timesteps with fixed noise: numbers comparable across epochs, runs and models.

A training loss draws ``t`` and the noise at random, so two validation passes of the same weights disagree and a
loss of 0.031 at epoch 3 says little against 0.029 at epoch 4. Here every validation batch is scored at each ``t``
of a fixed grid with noise that depends only on ``(seed, dataloader_index, batch_index, t)``: the same weights give
the same numbers on every run and every rank (each rank scores its own batches, with the noise of their index).

Noise of timestep ``t`` for batch ``batch_index`` of dataloader ``dataloader_index``: standard normal, float32, of
the batch's shape, drawn from a CPU ``torch.Generator`` seeded with :func:`fixed_noise_seed`, i.e.
``derive_seed(seed, 2, dataloader_index, batch_index, t)`` (see
:func:`lightning_ldm.seeding.derive_seed`; stream 2, apart from ``DiffusionSeedCallback``'s training stream 0
and validation stream 1), then moved to the batch's device. Drawing on the CPU makes it the same on every device.

Typical use in a ``validation_step``::

    losses = fixed_timestep_losses(
        lambda x, t, n: self.diffusion_loss(self.net, x, t=t, noise=n),
        batch, (100, 300, 500, 700, 900), seed=0, batch_index=batch_idx, dataloader_index=dataloader_idx,
    )
    log_timestep_losses(self, losses, prefix="val/loss", batch_size=batch.shape[0])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_ldm._checks import check_int, check_tensor, check_timestep_list
from lightning_ldm.seeding import derive_seed

__all__ = [
    "FIXED_NOISE_STREAM",
    "fixed_noise",
    "fixed_noise_seed",
    "fixed_timestep_losses",
    "log_timestep_losses",
]

log = logging.getLogger(__name__)

#: Stream key of the fixed validation noise in :func:`~lightning_ldm.seeding.derive_seed`.
FIXED_NOISE_STREAM = 2


def fixed_noise_seed(seed: int, t: int, *, batch_index: int, dataloader_index: int = 0) -> int:
    """The generator seed of timestep ``t``'s noise: ``derive_seed(seed, 2, dataloader_index, batch_index, t)``.

    Args:
        seed: Base seed (non-negative).
        t: Timestep (non-negative).
        batch_index: Index of the batch in its dataloader (non-negative).
        dataloader_index: Index of the dataloader (non-negative).

    Returns:
        An int in ``[0, 2**63)``.

    Raises:
        TypeError: An argument is not an integer.
        ValueError: An argument is negative.
    """
    keys = (
        check_int("seed", seed, minimum=0),
        FIXED_NOISE_STREAM,
        check_int("dataloader_index", dataloader_index, minimum=0),
        check_int("batch_index", batch_index, minimum=0),
        check_int("t", t, minimum=0),
    )
    return derive_seed(*keys)


def fixed_noise(like: Tensor, t: int, *, seed: int, batch_index: int, dataloader_index: int = 0) -> Tensor:
    """The fixed float32 noise of timestep ``t`` for a batch shaped like ``like``, on ``like``'s device.

    Args:
        like: The batch (its shape and device are used).
        t: Timestep.
        seed: Base seed.
        batch_index: Index of the batch in its dataloader.
        dataloader_index: Index of the dataloader.

    Returns:
        float32 standard normal tensor of ``like``'s shape.

    Raises:
        TypeError: An index or the seed is not an integer.
        ValueError: An index or the seed is negative.
    """
    generator = torch.Generator().manual_seed(
        fixed_noise_seed(seed, t, batch_index=batch_index, dataloader_index=dataloader_index)
    )
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def fixed_timestep_losses(
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x_start: Tensor,
    timesteps: Iterable[int],
    *,
    seed: int,
    batch_index: int,
    dataloader_index: int = 0,
    num_timesteps: int | None = None,
) -> dict[int, Tensor]:
    """Score one batch at every timestep of a fixed grid with the fixed noise of :func:`fixed_noise`.

    Args:
        loss_fn: ``loss_fn(x_start, t, noise)`` → the batch's scalar loss, with ``t`` a ``(B,)`` LongTensor filled
            with one timestep and ``noise`` float32 of ``x_start``'s shape (e.g. a ``diffusion_loss`` call).
        x_start: The batch of clean samples ``(B, ...)``.
        timesteps: Distinct non-negative timesteps.
        seed: Base seed of the noise.
        batch_index: Index of the batch in its dataloader.
        dataloader_index: Index of the dataloader.
        num_timesteps: T, to check every timestep lies in ``[0, T)`` here (``loss_fn`` checks otherwise).

    Returns:
        ``{t: scalar loss}`` in the order of ``timesteps``.

    Raises:
        TypeError: ``timesteps`` is not a sequence of integers, ``x_start`` is not a tensor, or ``loss_fn`` returned
            something other than a tensor.
        ValueError: ``timesteps`` is empty, repeats a timestep or holds one outside ``[0, T)``, ``x_start`` has no
            batch dimension, or ``loss_fn`` returned more than one number.
    """
    grid = check_timestep_list(timesteps, num_timesteps)
    check_tensor("x_start", x_start)
    if x_start.ndim < 1 or x_start.shape[0] < 1:
        raise ValueError(f"x_start must have a non-empty batch dimension, got shape {tuple(x_start.shape)}")
    losses: dict[int, Tensor] = {}
    for step in grid:
        noise = fixed_noise(x_start, step, seed=seed, batch_index=batch_index, dataloader_index=dataloader_index)
        t = torch.full((x_start.shape[0],), step, dtype=torch.long, device=x_start.device)
        loss = loss_fn(x_start, t, noise)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} at t={step}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar (one number), got shape {tuple(loss.shape)} at t={step}")
        losses[step] = loss.reshape(())
    return losses


def log_timestep_losses(
    module: Any,
    losses: Mapping[int, Tensor],
    *,
    prefix: str = "val/loss",
    batch_size: int | None = None,
    prog_bar: bool = True,
) -> Tensor:
    """Log ``{t: loss}`` as ``f"{prefix}/t={t}"`` and their mean as ``f"{prefix}/mean"``, averaged over the epoch.

    Calls ``module.log_dict(..., on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)``: each key
    ends the epoch as the batch-size-weighted mean over batches (and ranks), and since the mean over ``t`` is
    linear, the epoch value of ``f"{prefix}/mean"`` is the mean of the epoch values of the per-``t`` keys.

    Args:
        module: The ``LightningModule`` logging (inside a ``*_step`` hook).
        losses: ``{t: scalar loss}`` from :func:`fixed_timestep_losses`.
        prefix: Key prefix.
        batch_size: Batch size for Lightning's epoch average (inferred by Lightning when ``None``).
        prog_bar: Show the mean in the progress bar.

    Returns:
        The mean over ``t`` of this batch's losses.

    Raises:
        ValueError: ``losses`` is empty.
    """
    if not losses:
        raise ValueError("losses must hold at least one timestep's loss, got an empty mapping")
    values = {f"{prefix}/t={int(t)}": loss.detach() for t, loss in losses.items()}
    mean = torch.stack([loss.detach().float().reshape(()) for loss in losses.values()]).mean()
    options: dict[str, Any] = {"on_step": False, "on_epoch": True, "sync_dist": True, "batch_size": batch_size}
    module.log_dict(values, **options)
    module.log(f"{prefix}/mean", mean, prog_bar=prog_bar, **options)
    return mean
