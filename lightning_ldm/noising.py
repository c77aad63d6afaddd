r"""Forward noising and the parameterization identities, as functions of per-timestep tables.

Every identity here has the form :math:`a_t x + s \, b_t y` with :math:`a, b` tables indexed by the timestep:

=========================  ===================================  =====================================
function                   formula                              tables (a, b)
=========================  ===================================  =====================================
:func:`q_sample`           √ā·x0 + √(1−ā)·ε                      sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_noise`  √(1/ā)·x_t − √(1/ā−1)·ε       sqrt_recip, sqrt_recipm1
:func:`get_v`              √ā·ε − √(1−ā)·x0                     sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_v`      √ā·x_t − √(1−ā)·v             sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_noise_from_v`      √ā·v + √(1−ā)·x_t             sqrt_alphas_cumprod, sqrt_one_minus
=========================  ===================================  =====================================

so one function, :func:`combine`, does the arithmetic for all of them. Coefficients are gathered from the
(float32 or float64) tables and used in float32; only the result is cast to the sample's dtype. Casting the tables
to bf16 first, as some peers do, leaves **no noise at all** at t = 0 and 1.
"""

from __future__ import annotations

from torch import Tensor

from lightning_ldm.nn import check_timestep_indices, gather_coefficients

__all__ = [
    "combine",
    "get_v",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "q_sample",
]


def _check(t: Tensor, x: Tensor, y: Tensor, table: Tensor) -> None:
    check_timestep_indices(t, table.shape[0])
    if x.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(f"t has {t.shape[0]} timesteps but the sample has batch shape {tuple(x.shape[:1])}")
    if x.shape != y.shape:
        raise ValueError(f"the two tensors must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def combine(t: Tensor, coef_x: Tensor, x: Tensor, coef_y: Tensor, y: Tensor, sign: float = 1.0) -> Tensor:
    """Return ``coef_x[t]·x + sign·coef_y[t]·y`` with float32 coefficients, in ``x``'s dtype.

    No validation: callers check ``t`` (the public functions below do).
    """
    a = gather_coefficients(coef_x, t, x.ndim)
    b = gather_coefficients(coef_y, t, x.ndim)
    out = x * a  # float32 or wider: a is float32
    out.addcmul_(b, y, value=sign)
    return out.to(x.dtype)


def q_sample(
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Diffuse ``x_start`` to timestep ``t``: ``√ā_t·x_start + √(1−ā_t)·noise``.

    Args:
        x_start: Clean samples, batch first, any floating dtype.
        t: 1-D integer timesteps, one per sample.
        noise: Standard normal noise of ``x_start``'s shape.
        sqrt_alphas_cumprod: Table ``√ā`` (float32 or float64).
        sqrt_one_minus_alphas_cumprod: Table ``√(1−ā)``.
        validate: Check ``t`` and the shapes (one host sync on an accelerator). Hot loops that drew ``t`` themselves
            pass ``False``.

    Returns:
        Noisy samples in ``x_start``'s dtype.

    Raises:
        TypeError: ``t`` is not an integer tensor.
        ValueError: ``t`` is out of range or the shapes disagree.
    """
    if validate:
        _check(t, x_start, noise, sqrt_alphas_cumprod)
    return combine(t, sqrt_alphas_cumprod, x_start, sqrt_one_minus_alphas_cumprod, noise)


def predict_start_from_noise(
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (see :func:`q_sample` for the arguments)."""
    if validate:
        _check(t, x_t, noise, sqrt_recip_alphas_cumprod)
    return combine(t, sqrt_recip_alphas_cumprod, x_t, sqrt_recipm1_alphas_cumprod, noise, sign=-1.0)


def get_v(
    x_start: Tensor,
    noise: Tensor,
    t: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """The v-prediction target ``v = √ā_t·ε − √(1−ā_t)·x0`` (Salimans & Ho 2022)."""
    if validate:
        _check(t, noise, x_start, sqrt_alphas_cumprod)
    return combine(t, sqrt_alphas_cumprod, noise, sqrt_one_minus_alphas_cumprod, x_start, sign=-1.0)


def predict_start_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``x0 = √ā_t·x_t − √(1−ā_t)·v``."""
    if validate:
        _check(t, x_t, v, sqrt_alphas_cumprod)
    return combine(t, sqrt_alphas_cumprod, x_t, sqrt_one_minus_alphas_cumprod, v, sign=-1.0)


def predict_noise_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``ε = √ā_t·v + √(1−ā_t)·x_t``."""
    if validate:
        _check(t, x_t, v, sqrt_alphas_cumprod)
    return combine(t, sqrt_alphas_cumprod, v, sqrt_one_minus_alphas_cumprod, x_t)
