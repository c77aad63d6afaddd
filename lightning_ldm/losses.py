r"""The denoising loss and its weightings, as functions of a :class:`~lightning_ldm.noise_schedule.NoiseSchedule`.

:func:`diffusion_loss` noises ``x_start`` to ``t``, runs the model, and compares its output with the target of the
schedule's parameterization (eps → the noise, x0 → ``x_start``, v → ``√ā·ε − √(1−ā)·x0``); the error, its reduction
and the weights are float32 whatever the model's dtype or autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_ldm._checks import (
    check_choice,
    check_floating,
    check_real,
    check_same_shape,
    check_samples,
    check_tensor,
    check_timesteps,
)
from lightning_ldm.checkpointing import AUTOCAST_DEVICE_TYPES
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.noising import combine
from lightning_ldm.ops import mean_flat
from lightning_ldm.parameterization import LOSS_WEIGHTINGS, LossWeighting, prediction_target

__all__ = ["LOSS_TYPES", "LossType", "check_loss_options", "diffusion_loss"]

LossType = Literal["l2", "l1"]
LOSS_TYPES: tuple[str, ...] = ("l2", "l1")


def check_loss_options(loss_type: Any, loss_weighting: Any, min_snr_gamma: Any) -> float:
    """Check the options of a denoising loss; return ``min_snr_gamma`` as a float.

    Raises:
        ValueError: ``loss_type`` or ``loss_weighting`` is not among the choices, or ``min_snr_gamma <= 0``.
        TypeError: ``min_snr_gamma`` is not a real number.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    return check_real("min_snr_gamma", min_snr_gamma, minimum=0.0, min_inclusive=False)


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
    gamma = check_loss_options(loss_type, loss_weighting, min_snr_gamma)
    check_samples("x_start", x_start)
    check_floating("noise", noise)
    check_same_shape("x_start", x_start, "noise", noise)
    check_timesteps(t, schedule.num_timesteps, batch=x_start.shape[0], batch_of="x_start")
    if importance_weights is not None and check_tensor("importance_weights", importance_weights).shape != t.shape:
        raise ValueError(
            f"importance_weights must hold one weight per sample, shape {tuple(t.shape)}, got shape "
            f"{tuple(importance_weights.shape)}"
        )
    return _diffusion_loss(
        model,
        schedule,
        x_start,
        t,
        noise,
        dict(model_kwargs or {}),
        loss_type,
        loss_weighting,
        gamma,
        importance_weights,
    )


def _diffusion_loss(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    model_kwargs: Mapping[str, Any],
    loss_type: str,
    loss_weighting: str,
    gamma: float,
    importance_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """:func:`diffusion_loss` without validation: the package's internal path (its callers checked the arguments)."""
    weights = schedule._loss_weights(t, loss_weighting, gamma)
    a = schedule.table("sqrt_alphas_cumprod", x_start.device)
    b = schedule.table("sqrt_one_minus_alphas_cumprod", x_start.device)
    x_t = combine(t, a, x_start, b, noise)
    out = model(x_t, t, **model_kwargs)
    target = prediction_target(schedule.parameterization, x_start, noise, t, a, b)
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
