r"""What a denoiser predicts (ε, x0 or v): the training target, the recovery of x0 and ε, and the loss weights.

The lowest floor of the package's maths: the noise schedule, the losses and the samplers build on it. With
:math:`\bar\alpha` the cumulative product of the schedule and :math:`x_t = \sqrt{\bar\alpha}\,x_0 +
\sqrt{1-\bar\alpha}\,\varepsilon`:

=========  ======================  ============================  ============================
name       the network predicts    x0 from the output ``o``      ε from the output ``o``
=========  ======================  ============================  ============================
``"eps"``  ε                       ``(x_t − √(1−ā)·o) / √ā``     ``o``
``"x0"``   x0                      ``o``                         ``(x_t − √ā·o) / √(1−ā)``
``"v"``    ``√ā·ε − √(1−ā)·x0``    ``√ā·x_t − √(1−ā)·o``         ``√ā·o + √(1−ā)·x_t``
=========  ======================  ============================  ============================

diffusers calls them ``prediction_type`` ``"epsilon"``, ``"sample"`` and ``"v_prediction"``
(``lightning_ldm._checks.PREDICTION_TYPES``, which the scheduler check and the interop share). Nothing here
validates its arguments: the public entry points that call these
functions (:class:`~lightning_ldm.noise_schedule.NoiseSchedule`, :func:`~lightning_ldm.losses.diffusion_loss`, the
samplers) check them once.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_ldm.noising import combine

__all__ = [
    "LOSS_WEIGHTINGS",
    "PARAMETERIZATIONS",
    "LossWeighting",
    "Parameterization",
    "min_snr_weights",
    "prediction_target",
    "recovery_coefficients",
]

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")
LossWeighting = Literal["none", "min_snr", "vlb"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "vlb")


def prediction_target(
    parameterization: str,
    x_start: Tensor,
    noise: Tensor,
    t: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """What a network of ``parameterization`` should predict for ``x_start`` noised with ``noise`` at ``t``.

    ``"eps"``: ``noise``; ``"x0"``: ``x_start``; ``"v"``: ``√ā_t·noise − √(1−ā_t)·x_start`` in ``noise``'s dtype
    (coefficients gathered from the two tables in float32).
    """
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x_start
    return combine(t, sqrt_alphas_cumprod, noise, sqrt_one_minus_alphas_cumprod, x_start, sign=-1.0)


def recovery_coefficients(alpha: float, parameterization: str, where: str = "") -> tuple[float, float, float, float]:
    """Float64 ``(p, q, r, s)`` with ``x0 = p·x_t + q·o`` and ``ε = r·x_t + s·o`` for a model output ``o`` at ``ā``.

    Args:
        alpha: ``ā`` of the timestep, in [0, 1].
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.
        where: Where the step lies, for the error message (e.g. ``"at DDIM step 3 (timestep 61)"``).

    Raises:
        ValueError: ``"eps"`` at ``ā = 0`` (zero terminal SNR: the output carries no information about x0) or
            ``"x0"`` at ``ā = 1`` (no noise to recover).
    """
    if parameterization == "eps":
        if alpha <= 0.0:
            raise ValueError(
                f"parameterization='eps' cannot recover x0 {where}, where ā = {alpha!r} (zero terminal SNR); "
                "use a 'v' (or 'x0') model there, or steps that avoid the last timestep"
            )
        return 1 / math.sqrt(alpha), -math.sqrt(1 - alpha) / math.sqrt(alpha), 0.0, 1.0
    if parameterization == "x0":
        if alpha >= 1.0:
            raise ValueError(f"parameterization='x0' cannot recover ε {where}, where ā = {alpha!r} (no noise)")
        return 0.0, 1.0, 1 / math.sqrt(1 - alpha), -math.sqrt(alpha) / math.sqrt(1 - alpha)
    return math.sqrt(alpha), -math.sqrt(1 - alpha), math.sqrt(1 - alpha), math.sqrt(alpha)


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
