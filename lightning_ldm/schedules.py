r"""Beta schedules, zero-terminal-SNR rescaling and the float64 tables a diffusion model needs.

Notation: :math:`T` training timesteps, :math:`\beta_t` the schedule, :math:`\alpha_t = 1 - \beta_t`,
:math:`\bar\alpha_t = \prod_{s \le t} \alpha_s` (``alphas_cumprod``).

Everything here is computed in float64 and returned as numpy arrays, with CompVis' numbers (CompVis computes the
linear schedules with ``torch.linspace(..., dtype=torch.float64)``, so this module does too: ``numpy.linspace``
differs from it in the last bit of about a third of the entries).

Name swap with diffusers (see :mod:`lightning_ldm.interop`): seed ``"linear"`` (linear in √β) is diffusers'
``"scaled_linear"``, seed ``"sqrt_linear"`` (linear in β) is diffusers' ``"linear"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args, overload

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from lightning_ldm._checks import check_betas, check_callable, check_choice, check_floating, check_int, check_real

__all__ = [
    "SCHEDULES",
    "TABLE_NAMES",
    "ScheduleName",
    "betas_for_alpha_bar",
    "log_snr",
    "make_beta_schedule",
    "rescale_zero_terminal_snr",
    "schedule_tables",
    "snr",
]

ScheduleName = Literal["linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

#: Names of the tables :func:`schedule_tables` returns (CompVis ``register_schedule`` names, plus ``snr``).
TABLE_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "snr",
)

#: Floor of the logarithms (CompVis clips the posterior log-variance at this value).
LOG_FLOOR = 1e-20
#: Stand-in for ``ā = 0`` (a zero-terminal-SNR schedule) in the reciprocal tables: fp16's smallest subnormal, the
#: value diffusers' Euler scheduler uses for the same purpose. Keeps ``1/√ā`` at 4096, finite in float32 too.
TERMINAL_ALPHA_BAR = 2.0**-24


def _check_nonnegative(name: str, value: float) -> float:
    return check_real(name, value, minimum=0.0)


def make_beta_schedule(
    schedule: ScheduleName | str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    r"""Return CompVis' beta schedule: a float64 numpy array of shape ``(n_timestep,)``.

    =======================  ========================================================================================
    schedule                 β
    =======================  ========================================================================================
    ``"linear"``             ``linspace(√linear_start, √linear_end, n)²`` (diffusers: ``"scaled_linear"``)
    ``"cosine"``             ``1 − ā_{k+1}/ā_k`` clipped to [0, 0.999], ``ā_k = cos²((k/n + s)/(1 + s)·π/2)/ā_0``
    ``"squaredcos_cap_v2"``  :func:`betas_for_alpha_bar` of ``cos²((t + 0.008)/1.008·π/2)``; ignores the other args
    ``"sqrt_linear"``        ``linspace(linear_start, linear_end, n)`` (diffusers: ``"linear"``)
    ``"sqrt"``               ``linspace(linear_start, linear_end, n) ** 0.5``
    =======================  ========================================================================================

    With ``cosine_s=0.008``, ``"cosine"`` equals ``"squaredcos_cap_v2"`` to ~1e-16. Stable Diffusion uses
    ``"linear"`` with 0.00085 → 0.012.

    Args:
        schedule: Name of the schedule (see the table).
        n_timestep: Number of diffusion timesteps ``T`` (>= 1).
        linear_start: First value of the linear schedules (>= 0).
        linear_end: Last value of the linear schedules (>= 0).
        cosine_s: Offset ``s`` of the cosine schedule (>= 0).

    Returns:
        ``β``, float64, shape ``(n_timestep,)``.

    Raises:
        ValueError: Unknown ``schedule``; ``n_timestep < 1``; a negative or non-finite ``linear_start``,
            ``linear_end`` or ``cosine_s``; or a resulting beta outside [0, 1) (for instance ``linear_end >= 1``).
        TypeError: ``n_timestep`` is not an integer or a float argument is not a real number.
    """
    check_choice("schedule", schedule, SCHEDULES)
    n_timestep = check_int("n_timestep", n_timestep, minimum=1)
    linear_start = _check_nonnegative("linear_start", linear_start)
    linear_end = _check_nonnegative("linear_end", linear_end)
    cosine_s = _check_nonnegative("cosine_s", cosine_s)

    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(timesteps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0.0, max=0.999)
    elif schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    else:  # "sqrt"
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    out = betas.numpy()
    context = (
        f"make_beta_schedule({schedule!r}, n_timestep={n_timestep}, linear_start={linear_start:g}, "
        f"linear_end={linear_end:g}, cosine_s={cosine_s:g})"
    )
    return check_betas(out, allow_terminal_one=False, context=context)


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    r"""Discretize a continuous ``ā(t)``, ``t ∈ [0, 1]``, into ``N`` betas.

    ``β_i = min(1 − ā((i + 1)/N) / ā(i/N), max_beta)`` for ``i = 0 .. N − 1`` (no lower clip, as in CompVis).

    Args:
        num_diffusion_timesteps: Number of betas ``N`` (>= 1).
        alpha_bar: Non-increasing function from ``t ∈ [0, 1]`` to ``ā(t)``, positive on ``[0, 1)``.
        max_beta: Upper clip of each beta, in (0, 1]; values below 1 avoid the singularity at ``t = 1``.

    Returns:
        ``β``, float64, shape ``(N,)``.

    Raises:
        TypeError: ``alpha_bar`` is not callable, ``N`` not an integer or ``max_beta`` not a real number.
        ValueError: ``N < 1``, ``max_beta`` outside (0, 1], ``alpha_bar`` not positive where it divides, or a
            resulting beta that is negative (``alpha_bar`` increases) or not finite.
    """
    num_diffusion_timesteps = check_int("num_diffusion_timesteps", num_diffusion_timesteps, minimum=1)
    check_callable("alpha_bar", alpha_bar, "a callable t -> ā(t)")
    max_beta = check_real("max_beta", max_beta, minimum=0.0, maximum=1.0, min_inclusive=False)
    n = num_diffusion_timesteps
    betas = []
    for i in range(n):
        t1, t2 = i / n, (i + 1) / n
        a1 = alpha_bar(t1)
        if not a1 > 0:  # also catches NaN
            raise ValueError(f"alpha_bar({t1!r}) = {a1!r}; alpha_bar must be positive on [0, 1)")
        betas.append(min(1 - alpha_bar(t2) / a1, max_beta))
    context = f"betas_for_alpha_bar({n}, alpha_bar={alpha_bar!r}, max_beta={max_beta:g})"
    return check_betas(betas, allow_terminal_one=True, context=context)


def rescale_zero_terminal_snr(betas: ArrayLike) -> np.ndarray:
    r"""Rescale a schedule so that its last step has zero SNR (Lin et al. 2023, Algorithm 1).

    With ``s = √ā``: ``s' = (s − s_T)·s_0/(s_0 − s_T)``, then ``ā' = s'²``, ``α'_0 = ā'_0``,
    ``α'_t = ā'_t/ā'_{t−1}``, ``β' = 1 − α'``. The first ``ā`` is kept, the last becomes exactly 0 (``β'_T = 1``).
    Pair it with v-prediction (or x0) and ``"trailing"`` DDIM steps: an ε-model cannot recover x0 where ``ā = 0``.

    Args:
        betas: 1-D schedule with entries in [0, 1) (a last entry of 1 is accepted: rescaling is then the identity).

    Returns:
        Rescaled ``β'``, float64, same shape; ``β'_T = 1``.

    Raises:
        ValueError: ``betas`` is not 1-D with at least two entries, holds values outside [0, 1), or its last beta is
            0 (then ``ā`` is flat at the end and the rescaled schedule is undefined).
    """
    b = check_betas(betas)
    if b.shape[0] < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs at least 2 betas, got {b.shape[0]}")
    if b[-1] <= 0.0:
        raise ValueError(
            f"the last beta is {float(b[-1])!r}; rescale_zero_terminal_snr needs a positive last beta "
            "(a flat ā at the end cannot be moved to zero)"
        )
    s = np.sqrt(np.cumprod(1.0 - b))
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * (s0 / (s0 - s_last))
    alphas_cumprod = s**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _as_alphas_cumprod(alphas_cumprod: ArrayLike | Tensor) -> np.ndarray | Tensor:
    if isinstance(alphas_cumprod, Tensor):
        check_floating("alphas_cumprod", alphas_cumprod)
        return alphas_cumprod.to(torch.promote_types(alphas_cumprod.dtype, torch.float32))
    return np.asarray(alphas_cumprod, dtype=np.float64)


@overload
def snr(alphas_cumprod: Tensor) -> Tensor: ...
@overload
def snr(alphas_cumprod: ArrayLike) -> np.ndarray: ...
def snr(alphas_cumprod: ArrayLike | Tensor) -> np.ndarray | Tensor:
    r"""Signal-to-noise ratio ``ā/(1 − ā)``, finite everywhere.

    Zero where ``ā = 0`` (the last step of a zero-terminal-SNR schedule); ``1 − ā`` is floored at ``1e-20`` so
    ``ā = 1`` (a zero beta at the start) gives ``1e20`` instead of ``inf``.

    Args:
        alphas_cumprod: ``ā`` as a numpy array (computed in float64) or a tensor (computed in at least float32).

    Returns:
        SNR of the same kind (numpy float64, or a tensor of float32/float64 on the input's device).

    Raises:
        TypeError: ``alphas_cumprod`` is an integer tensor.
    """
    a = _as_alphas_cumprod(alphas_cumprod)
    if isinstance(a, Tensor):
        return a / (1 - a).clamp(min=LOG_FLOOR)
    return a / np.maximum(1 - a, LOG_FLOOR)


@overload
def log_snr(alphas_cumprod: Tensor) -> Tensor: ...
@overload
def log_snr(alphas_cumprod: ArrayLike) -> np.ndarray: ...
def log_snr(alphas_cumprod: ArrayLike | Tensor) -> np.ndarray | Tensor:
    r"""Log signal-to-noise ratio ``log ā − log(1 − ā)``, both logs floored at ``log(1e-20) ≈ −46.05``.

    Finite everywhere: ``ā = 0`` (zero terminal SNR) gives ``log(1e-20) − 0 ≈ −46.05``.

    Args:
        alphas_cumprod: ``ā`` as a numpy array (float64) or a tensor (at least float32).

    Returns:
        Log-SNR of the same kind.

    Raises:
        TypeError: ``alphas_cumprod`` is an integer tensor.
    """
    a = _as_alphas_cumprod(alphas_cumprod)
    if isinstance(a, Tensor):
        return torch.log(a.clamp(min=LOG_FLOOR)) - torch.log((1 - a).clamp(min=LOG_FLOOR))
    return np.log(np.maximum(a, LOG_FLOOR)) - np.log(np.maximum(1 - a, LOG_FLOOR))


def _reciprocal_safe(ac: np.ndarray) -> np.ndarray:
    """``ā*`` of :func:`schedule_tables`: ``ā`` where it is positive, ``min(2⁻²⁴, min ā > 0)`` where it is 0.

    A positive ``ā`` below float64's smallest normal number (whose reciprocal would overflow) counts as that number.
    """
    positive = ac > 0
    floored = np.maximum(ac, np.finfo(np.float64).tiny)
    smallest = float(floored[positive].min()) if positive.any() else TERMINAL_ALPHA_BAR
    return np.where(positive, floored, min(TERMINAL_ALPHA_BAR, smallest))


def schedule_tables(betas: ArrayLike, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    r"""All per-timestep tables of CompVis ``DDPM.register_schedule``, in float64, plus ``snr``.

    ==================================  ======================================================================
    table                               formula
    ==================================  ======================================================================
    ``alphas_cumprod``                  ``ā = cumprod(1 − β)``
    ``alphas_cumprod_prev``             ``[1, ā_0, …, ā_{T−2}]``
    ``sqrt_alphas_cumprod``             ``√ā``
    ``sqrt_one_minus_alphas_cumprod``   ``√(1 − ā)``
    ``log_one_minus_alphas_cumprod``    ``log(max(1 − ā, 1e-20))``
    ``sqrt_recip_alphas_cumprod``       ``√(1/ā*)``
    ``sqrt_recipm1_alphas_cumprod``     ``√(1/ā* − 1)``
    ``posterior_variance``              ``(1 − v)·β(1 − ā_prev)/(1 − ā) + v·β``
    ``posterior_log_variance_clipped``  ``log(max(posterior_variance, 1e-20))``
    ``posterior_mean_coef1``            ``β√ā_prev/(1 − ā)``
    ``posterior_mean_coef2``            ``(1 − ā_prev)√(1 − β)/(1 − ā)``
    ``snr``                             ``ā/(1 − ā)`` (see :func:`snr`)
    ==================================  ======================================================================

    For every schedule with ``0 < ā < 1`` these are the CompVis numbers exactly. Two edge cases stay finite
    instead of producing ``inf``/``NaN``:

    * ``ā = 0`` (the last step of a zero-terminal-SNR schedule, ``β_T = 1``): the reciprocal tables use
      ``ā* = min(2⁻²⁴, smallest positive ā)`` there (2⁻²⁴ is what diffusers' Euler scheduler substitutes), so
      ``sqrt_recip_alphas_cumprod[T−1] = 4096`` for the usual schedules; ``snr`` is 0 there. Wherever ``ā > 0``,
      ``ā* = ā``: the CompVis numbers, however large (the ``"sqrt"`` schedule reaches ``1/√ā ≈ 5.6e21`` at
      T = 1000, which float32 holds); only an ``ā`` so small that its reciprocal overflows float64 is raised to
      float64's smallest normal number.
    * ``ā = 1`` (leading zero betas): ``1 − ā`` is 0, so the posterior at those steps is the limit for
      ``β → 0``: variance 0, ``coef1 = 1``, ``coef2 = 0``; ``log(1 − ā)`` is floored at ``log(1e-20)``.

    Args:
        betas: 1-D schedule with entries in [0, 1); the last entry may be 1 (zero terminal SNR).
        v_posterior: Weight ``v`` in [0, 1] of ``β`` in the posterior variance (CompVis ``v_posterior``).

    Returns:
        Dict of the float64 tables named in :data:`TABLE_NAMES`, each of shape ``(T,)``.

    Raises:
        ValueError: ``betas`` is not a non-empty 1-D array of finite values in [0, 1) (last may be 1), or
            ``v_posterior`` is outside [0, 1].
    """
    b = check_betas(betas)
    v = check_real("v_posterior", v_posterior, minimum=0.0, maximum=1.0)
    alphas = 1.0 - b
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    one_minus = 1.0 - ac

    ac_safe = _reciprocal_safe(ac)

    noisy = one_minus > 0
    den = np.where(noisy, one_minus, 1.0)  # only used where noisy
    posterior_variance = np.where(noisy, (1 - v) * b * (1.0 - ac_prev) / den + v * b, v * b)
    coef1 = np.where(noisy, b * np.sqrt(ac_prev) / den, 1.0)
    coef2 = np.where(noisy, (1.0 - ac_prev) * np.sqrt(alphas) / den, 0.0)

    return {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(one_minus),
        "log_one_minus_alphas_cumprod": np.log(np.maximum(one_minus, LOG_FLOOR)),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac_safe),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac_safe - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, LOG_FLOOR)),
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": coef2,
        "snr": snr(ac),
    }
