r"""DDIM (Song et al. 2020): timestep selection, the per-step sigmas, the update and the sampling loop.

Notation: ``T`` training timesteps, ``n`` DDIM steps, ``ā`` = ``alphas_cumprod``; ``a``/``a_prev`` the ``ā`` of the
current and of the next (less noisy) DDIM step, ``σ`` the noise scale of the step.

One DDIM step, for every parameterization (model output ``o``):

==================  ==========================================  ==========================================
parameterization    predicted x0                                predicted ε
==================  ==========================================  ==========================================
``"eps"``           ``(x_t − √(1 − a)·o)/√a``                   ``o``
``"x0"``            ``o``                                       ``(x_t − √a·o)/√(1 − a)``
``"v"``             ``√a·x_t − √(1 − a)·o``                     ``√a·o + √(1 − a)·x_t``
==================  ==========================================  ==========================================

``x_prev = √a_prev·x0 + √(1 − a_prev − σ²)·ε + σ·z``, ``z ~ N(0, I)``.

Conventions kept from CompVis (its ``DDIMSampler``): the step list is ascending; the ``"uniform"`` and
``"quad"`` steps carry a +1 offset (they index ``ā`` directly and are the ``t`` the model sees); the "previous"
``ā`` of the first (least noisy) step is ``ā[0]``, not 1, so a sample ends at noise level ``ā[0]``.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from typing import Literal, get_args, overload

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from lightning_ldm._checks import check_callable, check_choice, check_floating, check_int, check_real
from lightning_ldm.parameterization import PARAMETERIZATIONS, Parameterization, recovery_coefficients

__all__ = [
    "DDIM_METHODS",
    "DDIMMethod",
    "ddim_sample",
    "ddim_step",
    "make_ddim_sampling_parameters",
    "make_ddim_timesteps",
]

log = logging.getLogger(__name__)

DDIMMethod = Literal["uniform", "quad", "linspace", "trailing"]
DDIM_METHODS: tuple[str, ...] = get_args(DDIMMethod)


def _seed_steps(method: str, n: int, total: int) -> np.ndarray:
    """CompVis' 'uniform'/'quad' steps, +1 offset included (may reach ``total``: callers check)."""
    if method == "uniform":
        c = total // n
        steps = np.asarray(list(range(0, total, c)))
    else:
        steps = ((np.linspace(0, np.sqrt(total * 0.8), n)) ** 2).astype(int)
    return (steps + 1).astype(np.int64)


def make_ddim_timesteps(
    ddim_discr_method: DDIMMethod | str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    r"""Select the DDIM steps out of ``T = num_ddpm_timesteps``: an ascending int64 numpy array.

    ==============  ===================================================================  ===========================
    method          steps                                                                length, range
    ==============  ===================================================================  ===========================
    ``"uniform"``   ``range(0, T, T // n) + 1`` (CompVis)                                ``ceil(T / (T // n))``
    ``"quad"``      ``floor(linspace(0, √(0.8·T), n)²) + 1`` (CompVis)                   ``n``, may repeat entries
    ``"linspace"``  ``round(linspace(0, T − 1, n))`` (diffusers ``timestep_spacing``)    ``n`` distinct, [0, T − 1]
    ``"trailing"``  ``round(T − k·T/n) − 1``, ``k = 0..n−1`` (diffusers)                 ``n`` distinct, [0, T − 1]
    ==============  ===================================================================  ===========================

    CompVis behaviour kept for parity: ``"uniform"`` returns ``n`` steps only when ``T // n`` divides ``T`` evenly
    enough (``n = 30, T = 1000`` gives 31 steps); ``"quad"`` repeats entries for large ``n`` (``n = 50`` gives 49
    distinct) and, through float rounding, ends at ``0.8·T`` instead of ``0.8·T + 1`` for some ``T``.
    ``"trailing"`` reaches ``T − 1``, which a zero-terminal-SNR schedule needs. Its values are diffusers'
    ``DDIMScheduler(timestep_spacing="trailing").set_timesteps(n)`` ones, ascending, except that diffusers returns
    an extra step ``−1`` for some ``(T, n)`` (``T = 100, n = 29``): that entry is dropped here.

    Args:
        ddim_discr_method: One of ``"uniform"``, ``"quad"``, ``"linspace"``, ``"trailing"``.
        num_ddim_timesteps: Number of DDIM steps ``n``, in ``[1, T]``.
        num_ddpm_timesteps: Number of training timesteps ``T`` (>= 1).
        verbose: Log the selected steps (``logging`` at INFO level, logger ``"lightning_ldm"``).

    Returns:
        Ascending int64 steps, every one a valid index into a ``T``-entry table.

    Raises:
        ValueError: Unknown method (CompVis raises ``NotImplementedError``: here it is a ``ValueError`` listing
            the methods); ``n < 1``, ``T < 1`` or ``n > T``; or ``"uniform"``/``"quad"`` steps that would reach
            ``T`` (for ``T = 1000``, ``"uniform"`` with ``n`` in {3, 9, 27, 36, 37, 101–111, 251–333, 501–1000}):
            the message names the methods that work for these arguments.
        TypeError: ``n`` or ``T`` is not an integer.
    """
    return _ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose, _COMPVIS_NAMES)


#: How errors name the method, the number of steps and T: CompVis' arguments, and those of the samplers.
_COMPVIS_NAMES = ("ddim_discr_method", "num_ddim_timesteps", "num_ddpm_timesteps")
_SAMPLER_NAMES = ("method", "num_steps", "the schedule's timesteps")


def _ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool, names: tuple[str, ...]
) -> np.ndarray:
    """:func:`make_ddim_timesteps`, its errors naming the arguments ``names`` (method, steps, T) as the caller did."""
    method_name, steps_name, total_name = names
    check_choice(method_name, ddim_discr_method, DDIM_METHODS)
    T = check_int(total_name, num_ddpm_timesteps, minimum=1)
    n = check_int(steps_name, num_ddim_timesteps, minimum=1, maximum=T)

    if ddim_discr_method in ("uniform", "quad"):
        steps = _seed_steps(ddim_discr_method, n, T)
        if steps[-1] >= T:
            working = [m for m in ("uniform", "quad") if _seed_steps(m, n, T)[-1] < T] + ["linspace", "trailing"]
            raise ValueError(
                f"{method_name}={ddim_discr_method!r} with {steps_name}={n} and T={T} timesteps: CompVis' +1 offset "
                f"puts the last step at {int(steps[-1])}, outside the valid timesteps [0, {T - 1}]. Methods that "
                f"work for these arguments: {', '.join(map(repr, working))}"
            )
    elif ddim_discr_method == "linspace":
        steps = np.linspace(0, T - 1, n).round().astype(np.int64)
    else:  # "trailing": diffusers' float arithmetic, so the values match; arange may yield one extra step (~0)
        steps = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n][::-1].copy()
    if verbose:
        log.info("Selected timesteps for ddim sampler: %s", steps)
    return steps


def _steps_as_numpy(ddim_timesteps: ArrayLike | Tensor, size: int) -> np.ndarray:
    if isinstance(ddim_timesteps, Tensor):
        ddim_timesteps = ddim_timesteps.detach().cpu().numpy()
    steps = np.asarray(ddim_timesteps)
    if steps.dtype == np.bool_ or not np.issubdtype(steps.dtype, np.integer):
        raise TypeError(f"ddim_timesteps must hold integer timesteps, got dtype {steps.dtype}")
    if steps.ndim != 1 or steps.shape[0] < 1:
        raise ValueError(f"ddim_timesteps must be a non-empty 1-D array of timesteps, got shape {steps.shape}")
    lo, hi = int(steps.min()), int(steps.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"ddim_timesteps holds timestep {bad}, outside the valid range [0, {size - 1}] of alphacums "
            f"({size} entries)"
        )
    return steps.astype(np.int64)


def _alphacums_as_numpy(alphacums: ArrayLike | Tensor, name: str = "alphacums") -> np.ndarray:
    if isinstance(alphacums, Tensor):
        check_floating(name, alphacums)
        alphacums = alphacums.detach().cpu().double().numpy()
    ac = np.asarray(alphacums, dtype=np.float64)
    if ac.ndim != 1 or ac.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (ā per timestep), got shape {ac.shape}")
    ok = np.isfinite(ac) & (ac >= 0.0) & (ac <= 1.0)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{name}[{bad}]={float(ac[bad])!r} is not a cumulative alpha; expected values in [0, 1]")
    return ac


def _sampling_parameters(ac: np.ndarray, steps: np.ndarray, eta: float) -> tuple[np.ndarray, ...]:
    """Float64 (sigmas, alphas, alphas_prev) with CompVis' formula; raise where sigma is undefined."""
    alphas = ac[steps]
    alphas_prev = np.asarray([ac[0], *ac[steps[:-1]].tolist()])
    with np.errstate(divide="ignore", invalid="ignore"):
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    sigmas = np.where((alphas == 1.0) & (alphas_prev == 1.0), 0.0, sigmas)  # a step without noise: σ = 0
    if not np.isfinite(sigmas).all():
        i = int(np.flatnonzero(~np.isfinite(sigmas))[0])
        raise ValueError(
            f"sigma of DDIM step {i} (timestep {int(steps[i])}) is undefined: ā={alphas[i]!r} after "
            f"ā_prev={alphas_prev[i]!r}; ddim_timesteps must be ascending over a non-increasing alphacums"
        )
    return sigmas, alphas, alphas_prev


@overload
def make_ddim_sampling_parameters(
    alphacums: Tensor, ddim_timesteps: ArrayLike | Tensor, eta: float, verbose: bool = True
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def make_ddim_sampling_parameters(
    alphacums: np.ndarray | ArrayLike, ddim_timesteps: ArrayLike | Tensor, eta: float, verbose: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def make_ddim_sampling_parameters(
    alphacums: ArrayLike | Tensor, ddim_timesteps: ArrayLike | Tensor, eta: float, verbose: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[Tensor, Tensor, Tensor]:
    r"""CompVis' DDIM ``(sigmas, alphas, alphas_prev)`` for the selected steps.

    ``alphas = ā[ts]``, ``alphas_prev = [ā[0], ā[ts[0]], …, ā[ts[n−2]]]`` (the first "previous" is ``ā[0]``, not
    1), ``sigmas = eta·√((1 − a_prev)/(1 − a)·(1 − a/a_prev))`` (eq. 16 of Song et al.). A step with
    ``a = a_prev = 1`` (a zero beta at t = 0) gets ``σ = 0`` instead of CompVis' NaN.

    Computed in float64. One consistent type out (CompVis mixes numpy and torch for tensor input): a tensor
    ``alphacums`` gives tensors of its dtype on its device; anything else gives numpy arrays of ``alphacums``'s
    floating dtype (float64 for lists).

    Args:
        alphacums: ``ā``, 1-D, values in [0, 1].
        ddim_timesteps: Integer steps indexing ``alphacums`` (see :func:`make_ddim_timesteps`).
        eta: Noise scale, >= 0 (0: deterministic DDIM, 1: DDPM-like).
        verbose: Log the selected values (``logging`` at INFO level, logger ``"lightning_ldm"``).

    Returns:
        ``(sigmas, alphas, alphas_prev)``, each of shape ``(len(ddim_timesteps),)``.

    Raises:
        ValueError: ``eta < 0``; ``alphacums`` not 1-D or outside [0, 1]; ``ddim_timesteps`` not 1-D, empty or
            out of range; a sigma that is undefined (steps not ascending over a decreasing ``ā``).
        TypeError: ``eta`` is not a real number, ``ddim_timesteps`` not integer, ``alphacums`` an integer tensor.
    """
    eta = check_real("eta", eta, minimum=0.0)
    ac = _alphacums_as_numpy(alphacums)
    steps = _steps_as_numpy(ddim_timesteps, ac.shape[0])
    sigmas, alphas, alphas_prev = _sampling_parameters(ac, steps, eta)
    if verbose:
        log.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        log.info(
            "For the chosen value of eta, which is %s, this results in the following sigma_t schedule for ddim "
            "sampler %s",
            eta,
            sigmas,
        )
    if isinstance(alphacums, Tensor):
        like = alphacums
        s_t, a_t, ap_t = (
            torch.from_numpy(v).to(device=like.device, dtype=like.dtype) for v in (sigmas, alphas, alphas_prev)
        )
        return s_t, a_t, ap_t
    dtype = alphacums.dtype if isinstance(alphacums, np.ndarray) and alphacums.dtype.kind == "f" else np.float64
    return sigmas.astype(dtype), alphas.astype(dtype), alphas_prev.astype(dtype)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _step_coefficients(
    a: float, a_prev: float, sigma: float, parameterization: str, where: str
) -> tuple[float, float, float, float, float, float]:
    """Float64 ``(p, q, r, s, √a_prev, d)``: ``x0 = p·x + q·o``, ``ε = r·x + s·o``, ``x_prev = √a_prev·x0 + d·ε``.

    Raises where the parameterization cannot recover x0/ε (see :func:`recovery_coefficients`) or
    ``σ² > 1 − a_prev``.
    """
    p, q, r, s = recovery_coefficients(a, parameterization, where)
    rest = 1 - a_prev - sigma**2
    if rest < -1e-12:
        raise ValueError(f"sigma={sigma:g} is too large {where}: sigma² exceeds 1 - ā_prev = {1 - a_prev:g}; lower eta")
    return p, q, r, s, math.sqrt(a_prev), math.sqrt(max(rest, 0.0))


def _coef(v: float | Tensor, device: torch.device) -> float | Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=torch.promote_types(v.dtype, torch.float32))
    return float(v)


def _sqrt(v: float | Tensor) -> float | Tensor:
    return v.sqrt() if isinstance(v, Tensor) else math.sqrt(v)


def _f32(v: float | Tensor) -> float | Tensor:
    return v.to(torch.float32) if isinstance(v, Tensor) else v


def ddim_step(
    x_t: Tensor,
    model_output: Tensor,
    alpha: float | Tensor,
    alpha_prev: float | Tensor,
    sigma: float | Tensor,
    *,
    parameterization: Parameterization | str = "eps",
    noise: Tensor | None = None,
    clip_x0: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One DDIM update ``x_t → x_prev`` (CompVis' ``p_sample_ddim`` arithmetic), in float32.

    ``x0`` and ``ε`` from the model output (see the module's table), ``x0`` clamped to ``[−clip_x0, clip_x0]`` when
    given (``ε`` is not recomputed from the clamped ``x0``, as in diffusers' default), then
    ``x_prev = √a_prev·x0 + √(1 − a_prev − σ²)·ε + σ·noise``.

    Args:
        x_t: Current sample, any floating dtype.
        model_output: Model output for ``x_t`` in ``parameterization``, same shape (bf16 under autocast is fine).
        alpha: ``ā`` of the current step: a number or a tensor broadcastable to ``x_t`` (e.g. ``(B, 1, 1, 1)``).
        alpha_prev: ``ā`` of the step the update goes to.
        sigma: Noise scale ``σ`` of the step (see :func:`make_ddim_sampling_parameters`).
        parameterization: What the model predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        noise: Standard normal noise of ``x_t``'s shape; drawn with ``torch.randn_like`` when ``None`` and ``sigma``
            is not the number 0.
        clip_x0: Clamp the predicted x0 to ``[−clip_x0, clip_x0]`` (e.g. 1.0 for pixel-space data); ``None``: off.

    Returns:
        ``(x_prev, pred_x0)`` in ``x_t``'s dtype.

    Raises:
        ValueError: Unknown ``parameterization``; shapes that differ; ``clip_x0 <= 0``; and, for numbers (tensor
            coefficients are not inspected, which would sync an accelerator): ``alpha``/``alpha_prev`` outside
            [0, 1], ``sigma < 0``, ``sigma² > 1 − alpha_prev``, ``"eps"`` with ``alpha = 0`` or ``"x0"`` with
            ``alpha = 1``.
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)}, expected the shape of x_t {tuple(x_t.shape)}"
        )
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the shape of x_t {tuple(x_t.shape)}")
    if clip_x0 is not None:
        clip_x0 = check_real("clip_x0", clip_x0, minimum=0.0, min_inclusive=False)
    if _is_real(alpha) and _is_real(alpha_prev) and _is_real(sigma):
        check_real("alpha", alpha, minimum=0.0, maximum=1.0)
        check_real("alpha_prev", alpha_prev, minimum=0.0, maximum=1.0)
        check_real("sigma", sigma, minimum=0.0)
        _step_coefficients(float(alpha), float(alpha_prev), float(sigma), parameterization, "in ddim_step")

    x = x_t.to(torch.float32)
    out = model_output.to(torch.float32)
    a, a_prev, sig = (_coef(v, x.device) for v in (alpha, alpha_prev, sigma))
    sqrt_a, sqrt_1ma = _f32(_sqrt(a)), _f32(_sqrt(1 - a))
    if parameterization == "eps":
        e_t = out
        pred_x0 = (x - sqrt_1ma * out) / sqrt_a
    elif parameterization == "x0":
        pred_x0 = out
        e_t = (x - sqrt_a * out) / sqrt_1ma
    else:
        pred_x0 = sqrt_a * x - sqrt_1ma * out
        e_t = sqrt_a * out + sqrt_1ma * x
    if clip_x0 is not None:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
    dir_xt = _f32(_sqrt(1 - a_prev - sig**2)) * e_t
    x_prev = _f32(_sqrt(a_prev)) * pred_x0 + dir_xt
    if isinstance(sig, Tensor) or sig != 0.0:
        z = torch.randn_like(x) if noise is None else noise.to(torch.float32)
        x_prev = x_prev + _f32(sig) * z
    return x_prev.to(x_t.dtype), pred_x0.to(x_t.dtype)


@overload
def ddim_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,  # noqa: N803 (CompVis' name)
    alphas_cumprod: ArrayLike | Tensor,
    *,
    num_steps: int = 50,
    method: DDIMMethod | str = "uniform",
    eta: float = 0.0,
    parameterization: Parameterization | str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    return_intermediates: Literal[False] = False,
) -> Tensor: ...
@overload
def ddim_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,  # noqa: N803 (CompVis' name)
    alphas_cumprod: ArrayLike | Tensor,
    *,
    num_steps: int = 50,
    method: DDIMMethod | str = "uniform",
    eta: float = 0.0,
    parameterization: Parameterization | str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    return_intermediates: Literal[True],
) -> tuple[Tensor, dict[str, list[Tensor]]]: ...
@torch.no_grad()
def ddim_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,  # noqa: N803 (CompVis' name)
    alphas_cumprod: ArrayLike | Tensor,
    *,
    num_steps: int = 50,
    method: DDIMMethod | str = "uniform",
    eta: float = 0.0,
    parameterization: Parameterization | str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    r"""Run DDIM from ``x_T`` down the steps of :func:`make_ddim_timesteps` (under ``torch.no_grad``).

    The per-step coefficients are computed once, in float64, before the loop; without ``clip_x0`` and
    intermediates each step is then ``x ← A·x + B·o (+ σ·z)``, two or three kernels besides the model (the update
    of :func:`ddim_step`, regrouped: ``A = √a_prev·p + d·r``, ``B = √a_prev·q + d·s``). The sample is kept in
    float32; the model gets it in ``x_T``'s dtype, with ``t`` as a ``(B,)`` int64 tensor of the step (for
    ``"uniform"``/``"quad"`` the +1-offset value, as CompVis' sampler passes it).

    Args:
        model_fn: ``model_fn(x_t, t) -> output`` in ``parameterization``, shape of ``x_t`` (bf16 is fine).
        x_T: Starting noise, batch first, any floating dtype.
        alphas_cumprod: ``ā`` of the trained schedule (numpy or tensor, 1-D, values in [0, 1]).
        num_steps: Number of DDIM steps ``n``.
        method: Step selection (see :func:`make_ddim_timesteps`); ``"uniform"`` may give more than ``n`` steps.
        eta: Noise scale, >= 0 (0: deterministic).
        parameterization: What ``model_fn`` predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        generator: Random generator for the ``eta > 0`` noise (on ``x_T``'s device); the global one when ``None``.
        clip_x0: Clamp the predicted x0 to ``[−clip_x0, clip_x0]``; ``None``: off.
        return_intermediates: Also return ``{"x_inter": [...], "pred_x0": [...]}``: ``x_T`` then the value after
            every step (each list has ``steps + 1`` entries, in ``x_T``'s dtype).

    Returns:
        The sample in ``x_T``'s dtype, or ``(sample, intermediates)``.

    Raises:
        TypeError: ``model_fn`` is not callable, ``x_T`` is not a floating tensor, or ``model_fn`` returns
            something that is not a tensor.
        ValueError: ``num_steps`` outside ``[1, T]``; every error of :func:`make_ddim_timesteps` and
            :func:`make_ddim_sampling_parameters`; an unknown ``parameterization``; ``x_T`` without a batch
            dimension; ``clip_x0 <= 0``; ``"eps"`` at a step where ``ā = 0`` (use ``"v"`` with zero-terminal-SNR
            schedules); an ``eta`` with ``σ² > 1 − a_prev``; a model output of the wrong shape.
    """
    check_callable("model_fn", model_fn, "callable as model_fn(x_t, t)")
    check_floating("x_T", x_T, min_ndim=1)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if clip_x0 is not None:
        clip_x0 = check_real("clip_x0", clip_x0, minimum=0.0, min_inclusive=False)
    eta = check_real("eta", eta, minimum=0.0)
    ac = _alphacums_as_numpy(alphas_cumprod, "alphas_cumprod")
    steps = _ddim_timesteps(method, num_steps, ac.shape[0], False, _SAMPLER_NAMES)
    sigmas, alphas, alphas_prev = _sampling_parameters(ac, steps, eta)

    # Coefficients, noisiest step first, as python floats (no device round trip inside the loop).
    plan = []
    for i in reversed(range(len(steps))):
        where = f"at DDIM step {i} (timestep {int(steps[i])})"
        p, q, r, s, sqrt_ap, d = _step_coefficients(
            float(alphas[i]), float(alphas_prev[i]), float(sigmas[i]), parameterization, where
        )
        plan.append((p, q, r, s, sqrt_ap, d, sqrt_ap * p + d * r, sqrt_ap * q + d * s, float(sigmas[i])))

    batch = x_T.shape[0]
    t_rows = torch.as_tensor(np.repeat(steps[::-1, None], batch, axis=1), device=x_T.device)  # (n, B) int64
    fused = clip_x0 is None and not return_intermediates
    x = x_T.to(torch.float32)
    x_inter: list[Tensor] = [x_T]
    pred_list: list[Tensor] = [x_T]
    for k, (p, q, r, s, sqrt_ap, d, A, B, sigma) in enumerate(plan):
        out = model_fn(x.to(x_T.dtype), t_rows[k])
        if not isinstance(out, Tensor):
            raise TypeError(f"model_fn must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {tuple(out.shape)}, expected the shape of x_t {tuple(x.shape)} (the sample "
                "shape is batch first: (B, *the shape of one sample))"
            )
        if torch.promote_types(out.dtype, torch.float32) != torch.float32:
            out = out.to(torch.float32)
        if fused:
            x = torch.add(x * A, out, alpha=B)  # bf16/fp16 `out` is promoted inside the kernel
        else:
            pred_x0 = torch.add(x * p, out, alpha=q)
            if clip_x0 is not None:
                pred_x0 = pred_x0.clamp_(-clip_x0, clip_x0)
            e_t = torch.add(x * r, out, alpha=s) if r != 0.0 else out * s
            x = torch.add(pred_x0 * sqrt_ap, e_t, alpha=d)
            if return_intermediates:
                pred_list.append(pred_x0.to(x_T.dtype))
        if sigma > 0.0:
            x.add_(torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32), alpha=sigma)
        if return_intermediates:
            x_inter.append(x.to(x_T.dtype))
    result = x.to(x_T.dtype)
    if return_intermediates:
        return result, {"x_inter": x_inter, "pred_x0": pred_list}
    return result
