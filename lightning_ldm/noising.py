r"""Forward noising and the parameterization identities, as functions of per-timestep tables.

Every identity here has the form :math:`a_t x + s \, b_t y` with :math:`a, b` tables indexed by the timestep:

================================  =======================  =====================================
function                          formula                  tables (a, b)
================================  =======================  =====================================
:func:`q_sample`                  √ā·x0 + √(1−ā)·ε         sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_noise`  √(1/ā)·x_t − √(1/ā−1)·ε  sqrt_recip, sqrt_recipm1
:func:`get_v`                     √ā·ε − √(1−ā)·x0         sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_v`      √ā·x_t − √(1−ā)·v        sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_noise_from_v`      √ā·v + √(1−ā)·x_t        sqrt_alphas_cumprod, sqrt_one_minus
:func:`q_posterior_mean`          c1·x0 + c2·x_t           posterior_mean_coef1, coef2
================================  =======================  =====================================

so one function, :func:`combine`, does the arithmetic for all of them. Coefficients are gathered from the
(float32 or float64) tables and used in float32; only the result is cast to the sample's dtype. Casting the tables
to bf16 first, as some peers do, leaves **no noise at all** at t = 0 and 1.

Everything is plain eager PyTorch. For one fused kernel, compile the training step that calls these functions
(``torch.compile``): their checks skip host reads while compiling, so they trace into one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ldm._checks import check_floating, check_same_shape, check_timesteps
from lightning_ldm.ops import gather_coefficients

__all__ = [
    "combine",
    "get_v",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "q_posterior_mean",
    "q_sample",
]

_HALF = (torch.float16, torch.bfloat16)


def _check(t: Tensor, x: Tensor, y: Tensor, coef_x: Tensor, coef_y: Tensor, names: tuple[str, str]) -> None:
    if coef_x.ndim != 1 or coef_y.ndim != 1 or coef_x.shape != coef_y.shape:
        raise ValueError(
            f"the two coefficient tables must be 1-D and of one length, got shapes {tuple(coef_x.shape)} and "
            f"{tuple(coef_y.shape)}"
        )
    check_floating(names[0], x, min_ndim=1)
    check_floating(names[1], y)
    check_same_shape(names[0], x, names[1], y)
    check_timesteps(t, coef_x.shape[0], batch=x.shape[0], batch_of=names[0])


def combine(t: Tensor, coef_x: Tensor, x: Tensor, coef_y: Tensor, y: Tensor, sign: float = 1.0) -> Tensor:
    """Return ``coef_x[t]·x + sign·coef_y[t]·y`` with float32 coefficients, in ``x``'s dtype.

    The arithmetic is float32 (float64 for float64 samples) and rounds exactly as the reference's
    ``extract_into_tensor(a, t, x.shape) * x + extract_into_tensor(b, t, x.shape) * y`` does: each product rounded,
    their sum rounded; the result is then cast to ``x``'s dtype once.

    No validation: callers check ``t`` (the public functions below do).

    Args:
        t: 1-D integer timesteps, one per sample.
        coef_x: Table of ``a``, indexed by timestep.
        x: First tensor, batch first.
        coef_y: Table of ``b``.
        y: Second tensor, the shape of ``x``.
        sign: ``1.0`` or ``-1.0``: add or subtract the second term.

    Returns:
        ``a[t]·x + sign·b[t]·y`` in ``x``'s dtype.
    """
    a = gather_coefficients(coef_x, t, x.ndim)
    b = gather_coefficients(coef_y, t, x.ndim)
    if x.dtype in _HALF and y.dtype in _HALF and sign in (1.0, -1.0) and not (x.requires_grad or y.requires_grad):
        # bf16/fp16: upcast once and work in place; the CPU's mixed-dtype loops are slower (same bits either way)
        out = x.float().mul_(a)
        scaled = y.float().mul_(b)
        return (out.add_(scaled) if sign == 1.0 else out.sub_(scaled)).to(x.dtype)
    out = x * a  # float32 or wider: a is float32
    if sign == 1.0:
        out += y * b  # two rounded products, one rounded sum: the reference's `a[t] * x + b[t] * y`, bit for bit
    elif sign == -1.0:
        out -= y * b
    else:
        out += y * (b * sign)
    return out.to(x.dtype)


def q_sample(
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """Diffuse ``x_start`` to timestep ``t``: ``√ā_t·x_start + √(1−ā_t)·noise``.

    Args:
        x_start: Clean samples, batch first, any floating dtype.
        t: 1-D integer timesteps, one per sample.
        noise: Standard normal noise of ``x_start``'s shape.
        sqrt_alphas_cumprod: Table ``√ā`` (float32 or float64).
        sqrt_one_minus_alphas_cumprod: Table ``√(1−ā)``.

    Returns:
        Noisy samples in ``x_start``'s dtype.

    Raises:
        TypeError: ``t`` is not an integer tensor, or ``x_start``/``noise`` is not a floating tensor.
        ValueError: ``t`` is out of range or the shapes disagree.
    """
    _check(t, x_start, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_start", "noise"))
    return combine(t, sqrt_alphas_cumprod, x_start, sqrt_one_minus_alphas_cumprod, noise)


def predict_start_from_noise(
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
) -> Tensor:
    """Recover ``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (see :func:`q_sample` for the arguments)."""
    _check(t, x_t, noise, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, ("x_t", "noise"))
    return combine(t, sqrt_recip_alphas_cumprod, x_t, sqrt_recipm1_alphas_cumprod, noise, sign=-1.0)


def get_v(
    x_start: Tensor,
    noise: Tensor,
    t: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """The v-prediction target ``v = √ā_t·ε − √(1−ā_t)·x0`` (Salimans & Ho 2022)."""
    _check(t, x_start, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_start", "noise"))
    return combine(t, sqrt_alphas_cumprod, noise, sqrt_one_minus_alphas_cumprod, x_start, sign=-1.0)


def predict_start_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """Recover ``x0 = √ā_t·x_t − √(1−ā_t)·v``."""
    _check(t, x_t, v, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_t", "v"))
    return combine(t, sqrt_alphas_cumprod, x_t, sqrt_one_minus_alphas_cumprod, v, sign=-1.0)


def predict_noise_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """Recover ``ε = √ā_t·v + √(1−ā_t)·x_t``."""
    _check(t, x_t, v, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_t", "v"))
    return combine(t, sqrt_alphas_cumprod, v, sqrt_one_minus_alphas_cumprod, x_t)


def q_posterior_mean(
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    posterior_mean_coef1: Tensor,
    posterior_mean_coef2: Tensor,
) -> Tensor:
    """The mean of ``q(x_{t−1} | x_t, x_0)``: ``c1_t·x_start + c2_t·x_t``, in ``x_start``'s dtype."""
    _check(t, x_start, x_t, posterior_mean_coef1, posterior_mean_coef2, ("x_start", "x_t"))
    return combine(t, posterior_mean_coef1, x_start, posterior_mean_coef2, x_t)
