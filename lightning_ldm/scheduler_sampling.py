r"""Sampling with any diffusers-style scheduler object (DDIM, DPM-Solver++, Euler, UniPC, ...), duck-typed.

A scheduler built from our schedule (``DPMSolverMultistepScheduler.from_config(schedule.to_diffusers_config())``)
knows the same ``ā`` and the same parameterization as the model; one that does not is refused by
:func:`~lightning_ldm._checks.check_scheduler` (re-exported here). This module needs no diffusers import: it only
calls the scheduler's ``set_timesteps``, ``timesteps``, ``step`` and, where it has them, ``init_noise_sigma`` and
``scale_model_input``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_ldm._checks import check_floating, check_scheduler, check_scheduler_steps

__all__ = ["scheduler_loop", "scheduler_sample"]


def _accepts(method: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@torch.no_grad()
def scheduler_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,  # noqa: N803 (the samplers' name)
    scheduler: Any,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    schedule: Any = None,
) -> Tensor:
    """Run ``scheduler``'s loop from ``x_T``: ``x ← scheduler.step(model_fn(x_in, t), t, x).prev_sample``.

    The loop state ``x`` is kept in float32 (float64 when ``x_T`` is float64); the model sees ``x_T``'s dtype.

    ``x_T`` is scaled by ``scheduler.init_noise_sigma`` (1 for DDPM-type schedulers, ``σ_max`` for Euler-type ones)
    and each model input by ``scheduler.scale_model_input`` when the scheduler has them. ``generator`` and ``eta``
    reach ``step`` when its signature takes them (DDIM takes both, DPM-Solver++ and Euler a generator).

    Args:
        model_fn: ``model_fn(x_t, t) -> output`` in the scheduler's ``prediction_type``; ``t`` is a ``(B,)`` tensor
            of the scheduler's timestep (integer for DDPM-type schedulers, float for Euler-type ones).
        x_T: Standard normal starting noise, batch first.
        scheduler: A diffusers-style scheduler object (it is mutated: ``set_timesteps`` and the multistep state).
        num_steps: Number of inference steps.
        eta: DDIM's η, passed only to a ``step`` that takes it.
        generator: Generator for the schedulers' noise, passed only to a ``step`` that takes it.
        schedule: The model's :class:`~lightning_ldm.noise_schedule.NoiseSchedule`: when given, a scheduler with
            another ``ā``, T or parameterization is refused (see :func:`~lightning_ldm._checks.check_scheduler`).

    Returns:
        The sample, in ``x_T``'s dtype.

    Raises:
        TypeError: ``scheduler`` lacks ``set_timesteps``/``step``, or ``x_T`` is not a floating tensor.
        ValueError: ``num_steps < 1`` or more than the scheduler supports (its timesteps would repeat), or a
            scheduler that does not match ``schedule``.
    """
    check_scheduler(scheduler, schedule)
    check_floating("x_T", x_T, min_ndim=1)
    return scheduler_loop(model_fn, x_T, scheduler, num_steps, eta, generator)


def scheduler_loop(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,  # noqa: N803 (the samplers' name)
    scheduler: Any,
    num_steps: int,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`scheduler_sample`'s loop for callers that checked the scheduler and ``x_T`` (the package's mixin).

    ``num_steps`` is still checked here, against what the scheduler supports (:func:`check_scheduler_steps`): that
    check is ``set_timesteps`` itself.
    """
    num_steps = check_scheduler_steps(scheduler, num_steps, device=x_T.device)
    extra: dict[str, Any] = {}
    if generator is not None and _accepts(scheduler.step, "generator"):
        extra["generator"] = generator
    if eta and _accepts(scheduler.step, "eta"):
        extra["eta"] = eta
    work = torch.promote_types(x_T.dtype, torch.float32)  # the loop runs in float32, or float64 for float64 x_T
    x = x_T.to(work) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    scale_input = getattr(scheduler, "scale_model_input", None)
    for step_t in scheduler.timesteps:
        x_in = scale_input(x, step_t) if callable(scale_input) else x
        t = torch.as_tensor(step_t, device=x.device).expand(x.shape[0])
        out = model_fn(x_in.to(x_T.dtype), t).to(work)
        x = scheduler.step(out, step_t, x, **extra).prev_sample
    return x.to(x_T.dtype)
