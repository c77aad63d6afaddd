"""The ``sampler=`` argument of :class:`~lightning_ldm.callbacks.ScheduleCallback`: an instance or a name."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

from lightning_ldm._checks import check_choice
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, TimestepSampler, UniformSampler

__all__ = ["SAMPLERS", "SamplerName", "build_sampler"]

SamplerName = Literal["uniform", "loss_aware", "logit_normal"]
#: The sampler names ``ScheduleCallback`` accepts, and the class each builds with its default arguments.
SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformSampler,
    "loss_aware": LossAwareSampler,
    "logit_normal": LogitNormalSampler,
}

# Former constructor options of ScheduleCallback: sampler options (accepted with a DeprecationWarning) and the
# logging options that moved to TimestepLossMonitor (refused with a TypeError that names the replacement).
_SAMPLER_OPTIONS = {
    "logit_normal_mean": ("logit_normal", "mean"),
    "logit_normal_std": ("logit_normal", "std"),
    "loss_aware_history": ("loss_aware", "history_per_term"),
    "loss_aware_uniform_prob": ("loss_aware", "uniform_prob"),
}
_MONITOR_OPTIONS = {
    "num_buckets": "num_buckets",
    "log_every_n_steps": "log_every_n_steps",
    "log_snr_curve": "log_schedule",
}


def build_sampler(sampler: SamplerName | TimestepSampler, deprecated: Mapping[str, Any]) -> TimestepSampler:
    """The sampler instance for ``sampler``, with the former flattened sampler options applied (deprecated).

    Args:
        sampler: A ``TimestepSampler`` instance (returned as is) or a name of :data:`SAMPLERS`.
        deprecated: Former keyword arguments of ``ScheduleCallback`` (see the module comment).

    Returns:
        The sampler.

    Raises:
        TypeError: ``sampler`` has the wrong type, or a keyword is unknown, moved, or given with an instance.
        ValueError: ``sampler`` is an unknown name, or an option belongs to another sampler.
    """
    for key in deprecated:
        if key in _MONITOR_OPTIONS:
            raise TypeError(
                f"ScheduleCallback({key}=...) moved to TimestepLossMonitor({_MONITOR_OPTIONS[key]}=...); add "
                "lightning_ldm.callbacks.TimestepLossMonitor to the Trainer's callbacks"
            )
        if key not in _SAMPLER_OPTIONS:
            raise TypeError(f"ScheduleCallback got an unexpected keyword argument {key!r}")
    if isinstance(sampler, TimestepSampler):
        if deprecated:
            raise TypeError(f"{', '.join(deprecated)} cannot be combined with a sampler instance ({sampler!r})")
        return sampler
    if not isinstance(sampler, str):
        hint = " (the seed is the second argument: pass seed=...)" if isinstance(sampler, int) else ""
        raise TypeError(
            f"sampler must be one of {', '.join(map(repr, SAMPLERS))} or a TimestepSampler instance, "
            f"got {sampler!r} of type {type(sampler).__name__}{hint}"
        )
    check_choice("sampler", sampler, SAMPLERS)
    options: dict[str, Any] = {}
    for key, value in deprecated.items():
        name, param = _SAMPLER_OPTIONS[key]
        if name != sampler:
            raise ValueError(f"{key} applies to sampler={name!r} only, got sampler={sampler!r}")
        options[param] = value
    cls: Callable[..., TimestepSampler] = SAMPLERS[sampler]
    if options:  # warned before building, so that an out-of-range value's error follows the explanation
        call = ", ".join(f"{param}={value!r}" for param, value in options.items())
        warnings.warn(
            f"ScheduleCallback({', '.join(f'{key}=...' for key in deprecated)}) is deprecated; pass "
            f"sampler={SAMPLERS[sampler].__name__}({call}) instead",
            DeprecationWarning,
            stacklevel=3,
        )
    return cls(**options)
