r"""Training loss by timestep bucket, as a torchmetrics ``Metric`` (correct under DDP).

The ``T`` timesteps are cut into ``num_buckets`` contiguous buckets, bucket ``b = ⌊t·num_buckets/T⌋``, i.e. bucket
``b`` holds ``t ∈ [⌈b·T/n⌉, ⌈(b + 1)·T/n⌉ − 1]``. The metric keeps, per bucket, the sum of the losses and their
count (both with ``dist_reduce_fx="sum"``), so :meth:`TimestepBucketLoss.compute` returns the mean loss per bucket
over every sample seen on every rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from lightning_ldm._checks import check_int

__all__ = ["TimestepBucketLoss", "bucket_bounds", "bucket_names"]


def bucket_bounds(num_timesteps: int, num_buckets: int) -> list[tuple[int, int]]:
    r"""Inclusive timestep range ``(lo, hi)`` of each bucket: ``lo = ⌈b·T/n⌉``, ``hi = ⌈(b + 1)·T/n⌉ − 1``.

    Args:
        num_timesteps: ``T`` (>= 1).
        num_buckets: ``n``, in ``[1, T]`` (so that no bucket is empty).

    Returns:
        ``n`` pairs that tile ``[0, T − 1]``.

    Raises:
        TypeError: An argument is not an integer.
        ValueError: ``T < 1`` or ``n`` outside ``[1, T]``.
    """
    num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
    num_buckets = check_int("num_buckets", num_buckets, minimum=1, maximum=num_timesteps)
    return [
        (-((-b * num_timesteps) // num_buckets), -((-(b + 1) * num_timesteps) // num_buckets) - 1)
        for b in range(num_buckets)
    ]


def bucket_names(num_timesteps: int, num_buckets: int, prefix: str = "loss_bucket/") -> list[str]:
    """Names ``"{prefix}{lo}-{hi}"`` of the buckets, zero-padded to the width of ``T − 1`` (``"loss_bucket/000-099"``).

    Args:
        num_timesteps: ``T`` (>= 1).
        num_buckets: ``n``, in ``[1, T]``.
        prefix: Prepended to every name.

    Returns:
        One name per bucket.
    """
    width = len(str(max(num_timesteps - 1, 0)))
    return [f"{prefix}{lo:0{width}d}-{hi:0{width}d}" for lo, hi in bucket_bounds(num_timesteps, num_buckets)]


class TimestepBucketLoss(Metric):
    r"""Mean per-sample loss in each of ``num_buckets`` timestep buckets.

    States ``loss_sum`` and ``count`` (float64, shape ``(num_buckets,)``, ``dist_reduce_fx="sum"``): under DDP,
    :meth:`compute` sums them over the ranks before dividing, so the result is the mean over all ranks' samples.

    Args:
        num_timesteps: ``T`` of the schedule (>= 1).
        num_buckets: Number of buckets, in ``[1, T]``.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: An argument is not an integer.
        ValueError: ``T < 1`` or ``num_buckets`` outside ``[1, T]``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    loss_sum: Tensor
    count: Tensor

    def __init__(self, num_timesteps: int, num_buckets: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=1, maximum=self.num_timesteps)
        self.add_state("loss_sum", torch.zeros(self.num_buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(self.num_buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def bucket_of(self, t: Tensor) -> Tensor:
        """Bucket index ``⌊t·num_buckets/T⌋`` of each timestep (long, on ``t``'s device)."""
        return torch.div(t.long() * self.num_buckets, self.num_timesteps, rounding_mode="floor")

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Add per-sample ``losses`` observed at timesteps ``t``.

        Args:
            t: Integer timesteps in ``[0, T)``, shape ``(N,)`` (not range-checked here: that would cost a device
                sync per step; the timesteps come from the module's sampler).
            losses: Per-sample losses, shape ``(N,)`` (any float dtype; accumulated in float64).

        Raises:
            ValueError: ``t`` and ``losses`` hold different numbers of entries.
        """
        t = t.detach().reshape(-1)
        losses = losses.detach().reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"t and losses must have the same number of entries, got {t.numel()} and {losses.numel()}")
        if t.numel() == 0:
            return
        bucket = self.bucket_of(t).to(self.loss_sum.device)
        self.loss_sum.index_add_(0, bucket, losses.to(self.loss_sum.device, torch.float64))
        self.count.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))

    def compute(self) -> Tensor:
        """Mean loss per bucket (float64, shape ``(num_buckets,)``, also for one bucket).

        NaN for a bucket with no sample, and for a bucket that received a NaN loss (it is not dropped).
        """
        return self.loss_sum / self.count.clamp(min=1.0) + torch.where(self.count > 0, 0.0, math.nan)

    @override
    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        """Keep :meth:`compute`'s ``(num_buckets,)`` shape: torchmetrics squeezes a one-element result to 0-d."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(wrapped)
        def compute_per_bucket(*args: Any, **kwargs: Any) -> Tensor:
            return wrapped(*args, **kwargs).reshape(-1)

        return compute_per_bucket

    def names(self, prefix: str = "loss_bucket/") -> list[str]:
        """Names of the buckets (see :func:`bucket_names`)."""
        return bucket_names(self.num_timesteps, self.num_buckets, prefix)
