r"""The denoising loss and its weightings, as functions of a :class:`~lightning_ldm.noise_schedule.NoiseSchedule`.

:func:`diffusion_loss` noises ``x_start`` to ``t``, runs the model, and compares its output with the target of the
schedule's parameterization (eps → the noise, x0 → ``x_start``, v → ``√ā·ε − √(1−ā)·x0``); the error, its reduction
and the weights are float32 whatever the model's dtype or autocast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_ldm import noising
from lightning_ldm._checks import check_choice, check_floating, check_same_shape, check_tensor, check_timesteps
from lightning_ldm.checkpointing import AUTOCAST_DEVICE_TYPES
from lightning_ldm.ops import mean_flat

if TYPE_CHECKING:
    from lightning_ldm.noise_schedule import NoiseSchedule

__all__ = ["LOSS_TYPES", "LOSS_WEIGHTINGS", "LossType", "LossWeighting", "diffusion_loss", "min_snr_weights"]

LossType = Literal["l2", "l1"]
LossWeighting = Literal["none", "min_snr", "vlb"]
LOSS_TYPES: tuple[str, ...] = ("l2", "l1")
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "vlb")


def min_snr_weights(snr: Tensor, gamma: float, parameterization: str) -> Tensor:
    r"""Min-SNR-γ loss weights (Hang et al. 2023) for per-sample SNRs ``snr``.

    * eps: ``min(s, γ)/s = γ/max(s, γ)`` (1 where ``s ≤ γ``);
    * x0: ``min(s, γ)``;
    * v: ``min(s, γ)/(s + 1)``;

    and weight 1 where ``s = 0`` (the terminal step of a zero-terminal-SNR schedule), as diffusers' training scripts
    do: the x0 and v formulas give 0 there, which would never train the step that zero-terminal-SNR sampling starts
    from.

    Args:
        snr: Float32 SNRs, shape ``(B,)``.
        gamma: γ > 0.
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.

    Returns:
        Weights of ``snr``'s shape and dtype.
    """
    clipped = snr.clamp(max=gamma)
    if parameterization == "eps":
        weights = gamma / snr.clamp(min=gamma)
    elif parameterization == "x0":
        weights = clipped
    else:
        weights = clipped / (snr + 1.0)
    return torch.where(snr == 0, torch.ones_like(weights), weights)


def prediction_target(schedule: NoiseSchedule, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What a network of ``schedule.parameterization`` should predict for ``x_start`` noised with ``noise`` at ``t``."""
    if schedule.parameterization == "eps":
        return noise
    if schedule.parameterization == "x0":
        return x_start
    a = schedule.table("sqrt_alphas_cumprod", noise.device)
    b = schedule.table("sqrt_one_minus_alphas_cumprod", noise.device)
    return noising.get_v(x_start, noise, t, a, b, validate=False)


def diffusion_loss(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    loss_type: LossType = "l2",
    loss_weighting: LossWeighting = "none",
    min_snr_gamma: float = 5.0,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The denoising loss: ``w_t·mean_flat(|model(x_t, t) − target|^p)`` per sample, and its mean.

    Args:
        model: The network, called as ``model(x_t, t, **model_kwargs)``.
        schedule: The noise schedule (its parameterization picks the target).
        x_start: Clean samples ``(B, ...)``, floating.
        t: Timesteps ``(B,)``, integer.
        noise: Noise of ``x_start``'s shape.
        model_kwargs: Extra keyword arguments for ``model`` (e.g. conditioning).
        loss_type: ``"l2"`` (p = 2) or ``"l1"`` (p = 1).
        loss_weighting: ``"none"``, ``"min_snr"`` or ``"vlb"`` (see :meth:`NoiseSchedule.loss_weights`).
        min_snr_gamma: γ of Min-SNR weighting, > 0.
        importance_weights: Per-sample factors applied to the mean only (``1/(T·p(t))`` of a non-uniform timestep
            sampler, which keeps the loss an unbiased estimate of the uniform-``t`` objective).

    Returns:
        ``(loss, per_sample)``: the scalar float32 loss and the float32 per-sample losses (weighted by ``w_t``, not
        by ``importance_weights``).

    Raises:
        TypeError: ``x_start``/``noise`` is not a floating tensor, ``t`` not an integer tensor, or
            ``importance_weights`` not a tensor.
        ValueError: A choice is not accepted, ``x_start`` is empty (no sample, or samples of no element), the shapes
            disagree (``importance_weights`` included: one weight per sample), ``t`` is out of range, or the model
            output's shape differs from the target's.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_floating("x_start", x_start, min_ndim=1)
    if x_start.shape[0] == 0 or math.prod(x_start.shape[1:]) == 0:
        raise ValueError(
            f"x_start must hold at least one sample of at least one element (a mean over none is NaN), got shape "
            f"{tuple(x_start.shape)}"
        )
    check_floating("noise", noise)
    check_same_shape("x_start", x_start, "noise", noise)
    check_timesteps(t, schedule.num_timesteps, batch=x_start.shape[0], batch_of="x_start")
    weights = schedule.loss_weights(t, loss_weighting, min_snr_gamma, validate=False)  # checked before the forward
    if importance_weights is not None and check_tensor("importance_weights", importance_weights).shape != t.shape:
        raise ValueError(
            f"importance_weights must hold one weight per sample, shape {tuple(t.shape)}, got shape "
            f"{tuple(importance_weights.shape)}"
        )

    a = schedule.table("sqrt_alphas_cumprod", x_start.device)
    b = schedule.table("sqrt_one_minus_alphas_cumprod", x_start.device)
    x_t = noising.q_sample(x_start, t, noise, a, b, validate=False)
    out = model(x_t, t, **dict(model_kwargs or {}))
    target = prediction_target(schedule, x_start, noise, t)
    if not isinstance(out, Tensor) or out.shape != target.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the model output has shape {shape}, the {schedule.parameterization!r} target {tuple(target.shape)}"
        )
    with _autocast_off(out.device.type):
        error = out.float() - target.float()
        per_sample = mean_flat(error.square() if loss_type == "l2" else error.abs())
        if weights is not None:
            per_sample = per_sample * weights
        scaled = per_sample if importance_weights is None else per_sample * importance_weights.float()
        return scaled.mean(), per_sample


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast for ``device_type`` (a no-op where autocast does not exist).

    A plain context-manager object, not a generator, so that ``torch.compile`` traces it on every supported torch.
    """
    if device_type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
