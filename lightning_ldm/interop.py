"""Conversion between this package's schedule arguments and a diffusers scheduler config (no diffusers import).

The two projects name the same schedules differently:

================================  =================================  =====================================
CompVis / ``lightning_ldm``          diffusers ``beta_schedule``         β
================================  =================================  =====================================
``"linear"``                      ``"scaled_linear"``                 linear in √β (Stable Diffusion)
``"sqrt_linear"``                 ``"linear"``                        linear in β
``"cosine"`` with s = 0.008       ``"squaredcos_cap_v2"``             cosine (equal to ~1e-16)
``"squaredcos_cap_v2"``           ``"squaredcos_cap_v2"``             cosine
``"sqrt"``                        (none)                              √ of linear
================================  =================================  =====================================

``zero_terminal_snr`` is diffusers' ``rescale_betas_zero_snr`` and the parameterizations ``"eps"``, ``"x0"``,
``"v"`` are its ``prediction_type`` ``"epsilon"``, ``"sample"``, ``"v_prediction"``. diffusers computes its betas in
float32, so the two sides agree to float32 rounding (~1e-9 on the betas), not bitwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lightning_ldm._checks import PREDICTION_TYPES, check_bool, check_choice, check_int, check_mapping, check_real
from lightning_ldm.schedule_config import ScheduleConfig
from lightning_ldm.schedules import make_beta_schedule

__all__ = ["from_diffusers_config", "to_diffusers_config"]

_TO_DIFFUSERS_SCHEDULE = {"linear": "scaled_linear", "sqrt_linear": "linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
_FROM_DIFFUSERS_SCHEDULE = {
    "scaled_linear": "linear",
    "linear": "sqrt_linear",
    "squaredcos_cap_v2": "squaredcos_cap_v2",
}
_TO_PREDICTION = dict(PREDICTION_TYPES)
_FROM_PREDICTION = {v: k for k, v in _TO_PREDICTION.items()}
#: The cosine offset of diffusers' "squaredcos_cap_v2".
DIFFUSERS_COSINE_S = 0.008

#: DDPMScheduler defaults, used for the keys a config leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


def to_diffusers_config(
    beta_schedule: str | ScheduleConfig = "linear",
    timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
    zero_terminal_snr: bool = False,
    parameterization: str = "eps",
) -> dict[str, Any]:
    """The diffusers scheduler config for our schedule (the keys of ``DDPMScheduler``'s config).

    The result works as ``DDPMScheduler(**config)``, ``DDIMScheduler(**config)`` or ``from_config(config)``, and
    holds exactly the schedule-defining keys: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type`` and ``rescale_betas_zero_snr``. Sampling options
    (``clip_sample``, ``timestep_spacing``, ...) are left to the caller. A config with ``given_betas`` gives them as
    ``trained_betas``; ``v_posterior`` has no diffusers key (it only changes the DDPM posterior variance).

    Args:
        beta_schedule: Our schedule name (see the module's table), or a whole
            :class:`~lightning_ldm.noise_schedule.ScheduleConfig` (then the other arguments are ignored).
        timesteps: Number of training timesteps.
        linear_start: First value of the linear schedules.
        linear_end: Last value of the linear schedules.
        cosine_s: Offset of the ``"cosine"`` schedule; only 0.008 has a diffusers equivalent.
        zero_terminal_snr: Rescale to zero terminal SNR (diffusers' ``rescale_betas_zero_snr``).
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.

    Returns:
        The config dict.

    Raises:
        ValueError: A schedule diffusers cannot express (``"sqrt"``, or ``"cosine"`` with ``cosine_s != 0.008``;
            the message shows how to pass the betas as ``trained_betas`` instead), an unknown parameterization, or
            any error of :func:`~lightning_ldm.schedules.make_beta_schedule` for these arguments.
        TypeError: ``zero_terminal_snr`` is not a bool, or a numeric argument has the wrong type.
    """
    if isinstance(beta_schedule, ScheduleConfig):
        config = beta_schedule
    else:
        make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)  # validates every argument
        config = ScheduleConfig(
            beta_schedule=beta_schedule,  # type: ignore[arg-type]
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
            zero_terminal_snr=zero_terminal_snr,
            parameterization=parameterization,  # type: ignore[arg-type]
        )
    out = {
        "num_train_timesteps": config.timesteps,
        "beta_start": config.linear_start,
        "beta_end": config.linear_end,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": _TO_PREDICTION[config.parameterization],
        "rescale_betas_zero_snr": config.zero_terminal_snr,
    }
    if config.given_betas is not None:
        return {**out, "trained_betas": list(config.given_betas)}
    name = config.beta_schedule
    hint = f"; pass the betas instead: trained_betas=make_beta_schedule({name!r}, {config.timesteps}, ...).tolist()"
    if name == "sqrt":
        raise ValueError(f"beta_schedule='sqrt' has no diffusers equivalent{hint}")
    if name == "cosine" and config.cosine_s != DIFFUSERS_COSINE_S:
        raise ValueError(
            f"beta_schedule='cosine' with cosine_s={config.cosine_s!r} has no diffusers equivalent (diffusers' "
            f"'squaredcos_cap_v2' fixes cosine_s={DIFFUSERS_COSINE_S}){hint}"
        )
    return {**out, "beta_schedule": "squaredcos_cap_v2" if name == "cosine" else _TO_DIFFUSERS_SCHEDULE[name]}


def from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our schedule arguments (``DiffusionMixin.register_schedule`` keyword arguments) for a diffusers config.

    Missing keys take ``DDPMScheduler``'s defaults (note: diffusers' default ``beta_schedule="linear"`` is our
    ``"sqrt_linear"``). Keys that do not define the schedule (``clip_sample``, ``timestep_spacing``,
    ``steps_offset``, ``_class_name``, ...) are ignored. A config with ``trained_betas`` gives
    ``given_betas`` (float64) and ``timesteps = len(trained_betas)``. ``"squaredcos_cap_v2"`` maps to our
    ``"squaredcos_cap_v2"``, which ignores ``cosine_s`` exactly as diffusers does.

    Args:
        config: A diffusers scheduler config (``scheduler.config`` or a loaded ``scheduler_config.json``).

    Returns:
        Dict with ``given_betas``, ``beta_schedule``, ``timesteps``, ``linear_start``, ``linear_end``,
        ``zero_terminal_snr`` and ``parameterization``.

    Raises:
        TypeError: ``config`` is not a mapping, or a value has the wrong type.
        ValueError: A ``beta_schedule`` or ``prediction_type`` we cannot express (the message lists the accepted
            ones), ``trained_betas`` that are not a 1-D list of numbers, or ``num_train_timesteps`` that disagrees
            with ``len(trained_betas)``.
    """
    check_mapping("config", config, "a mapping (a diffusers scheduler config)")
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k == "trained_betas"}}
    check_choice("config['beta_schedule']", cfg["beta_schedule"], tuple(_FROM_DIFFUSERS_SCHEDULE))
    check_choice("config['prediction_type']", cfg["prediction_type"], tuple(_FROM_PREDICTION))
    timesteps = check_int("config['num_train_timesteps']", cfg["num_train_timesteps"], minimum=1)
    linear_start = check_real("config['beta_start']", cfg["beta_start"], minimum=0.0)
    linear_end = check_real("config['beta_end']", cfg["beta_end"], minimum=0.0)
    zero_snr = check_bool("config['rescale_betas_zero_snr']", cfg["rescale_betas_zero_snr"])

    given_betas = None
    if cfg["trained_betas"] is not None:
        try:
            given_betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config['trained_betas'] must be a list of numbers: {err}") from None
        if given_betas.ndim != 1 or given_betas.shape[0] < 1:
            raise ValueError(f"config['trained_betas'] must be a non-empty 1-D list, got shape {given_betas.shape}")
        if "num_train_timesteps" in config and timesteps != given_betas.shape[0]:
            raise ValueError(
                f"config['num_train_timesteps']={timesteps} disagrees with len(config['trained_betas'])="
                f"{given_betas.shape[0]}"
            )
        timesteps = given_betas.shape[0]
    return {
        "given_betas": given_betas,
        "beta_schedule": _FROM_DIFFUSERS_SCHEDULE[cfg["beta_schedule"]],
        "timesteps": timesteps,
        "linear_start": linear_start,
        "linear_end": linear_end,
        "zero_terminal_snr": bool(zero_snr),
        "parameterization": _FROM_PREDICTION[cfg["prediction_type"]],
    }
