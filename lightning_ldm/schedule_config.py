r"""The arguments that define a noise schedule, as one frozen, validated object, and its fingerprint.

:class:`ScheduleConfig` holds the arguments of CompVis' ``register_schedule``, written once: the
:class:`~lightning_ldm.noise_schedule.NoiseSchedule`, the diffusers interop (:mod:`lightning_ldm.interop`), the
checkpoint guard of :class:`~lightning_ldm.mixin.DiffusionMixin` and its fingerprint all go through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lightning_ldm._checks import check_betas, check_bool, check_choice, check_int, check_mapping, check_real
from lightning_ldm.parameterization import PARAMETERIZATIONS, Parameterization
from lightning_ldm.schedules import SCHEDULES, ScheduleName, make_beta_schedule

__all__ = ["FINGERPRINT_VERSION", "ScheduleConfig", "fingerprint_difference"]

#: Version of the fingerprint layout (bumped if its keys change meaning).
FINGERPRINT_VERSION = 1
#: Which arguments change the betas of each named schedule (only these go into the fingerprint).
_SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("linear_start", "linear_end"),
    "sqrt_linear": ("linear_start", "linear_end"),
    "sqrt": ("linear_start", "linear_end"),
    "cosine": ("cosine_s",),
    "squaredcos_cap_v2": (),
}


@dataclass(frozen=True)
class ScheduleConfig:
    """The arguments that define a noise schedule (CompVis ``register_schedule``), validated and frozen.

    Args:
        beta_schedule: ``"linear"``, ``"cosine"``, ``"squaredcos_cap_v2"``, ``"sqrt_linear"`` or ``"sqrt"`` (see
            :func:`~lightning_ldm.schedules.make_beta_schedule`); ignored when ``given_betas`` is set.
        timesteps: Number of training timesteps T, >= 2 (set to ``len(given_betas)`` when those are given).
        linear_start: First beta of the linear-type schedules, >= 0.
        linear_end: Last beta of the linear-type schedules, >= 0.
        cosine_s: Offset ``s`` of the cosine schedule, >= 0.
        zero_terminal_snr: Rescale the betas so that the last ``ā`` is 0 (Lin et al. 2023).
        v_posterior: Weight ``v`` of ``β`` in the posterior variance ``(1 − v)·β̃ + v·β``, in [0, 1].
        parameterization: What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        given_betas: Explicit betas (at least 2, in [0, 1), the last may be 1), stored as a tuple of floats.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range or not among the accepted choices.
    """

    beta_schedule: ScheduleName | Literal["given"] = "linear"
    timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    zero_terminal_snr: bool = False
    v_posterior: float = 0.0
    parameterization: Parameterization = "eps"
    given_betas: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        values: dict[str, Any] = {
            "linear_start": check_real("linear_start", self.linear_start, minimum=0.0),
            "linear_end": check_real("linear_end", self.linear_end, minimum=0.0),
            "cosine_s": check_real("cosine_s", self.cosine_s, minimum=0.0),
            "zero_terminal_snr": check_bool("zero_terminal_snr", self.zero_terminal_snr),
            "v_posterior": check_real("v_posterior", self.v_posterior, minimum=0.0, maximum=1.0),
        }
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        if self.given_betas is not None:
            betas = check_betas(self.given_betas, "given_betas", min_length=2)
            values.update(given_betas=tuple(betas.tolist()), timesteps=int(betas.shape[0]), beta_schedule="given")
        else:
            check_choice("beta_schedule", self.beta_schedule, SCHEDULES)
            values["timesteps"] = check_int("timesteps", self.timesteps, minimum=2)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def make_betas(self) -> np.ndarray:
        """The float64 betas, before the zero-terminal-SNR rescaling.

        Raises:
            ValueError: The arguments give a beta outside [0, 1) (for instance ``linear_end >= 1``).
        """
        if self.given_betas is not None:
            return np.array(self.given_betas, dtype=np.float64)
        return make_beta_schedule(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end, self.cosine_s)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (the keyword arguments of ``register_schedule`` and of this class)."""
        out = dataclasses.asdict(self)
        if self.given_betas is not None:
            out["given_betas"] = list(self.given_betas)
            out["beta_schedule"] = "linear"  # ignored with given betas; keeps the dict a valid argument set
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScheduleConfig:
        """Build a config from :meth:`to_dict`'s output (or any subset of the fields).

        Raises:
            TypeError: ``values`` is not a mapping, or a value has the wrong type.
            ValueError: A key is not a field (the message lists them), or a value is not accepted.
        """
        check_mapping("values", values, "a mapping of schedule arguments")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown schedule argument(s) {unknown}; expected some of {fields}")
        return cls(**values)

    def fingerprint(self) -> dict[str, Any]:
        """A small JSON-able description of the schedule that a checkpoint stores to guard a resume.

        Keys: ``version``, ``beta_schedule`` (``"given"`` for explicit betas), ``timesteps``, the arguments that the
        named schedule uses (``linear_start``/``linear_end`` or ``cosine_s``) or ``betas_sha256`` for given betas,
        ``zero_terminal_snr``, ``v_posterior``, ``parameterization``.
        """
        out: dict[str, Any] = {"version": FINGERPRINT_VERSION, "beta_schedule": self.beta_schedule}
        out["timesteps"] = self.timesteps
        if self.given_betas is not None:
            raw = np.ascontiguousarray(self.given_betas, dtype="<f8").tobytes()
            out["betas_sha256"] = hashlib.sha256(raw).hexdigest()[:16]
        else:
            out.update({name: getattr(self, name) for name in _SCHEDULE_PARAMS[self.beta_schedule]})
        out.update(
            zero_terminal_snr=self.zero_terminal_snr,
            v_posterior=self.v_posterior,
            parameterization=self.parameterization,
        )
        return out


def fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, current)}`` for every key whose values differ (floats compared with a 1e-12 tolerance)."""
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        same = a == b
        if not same and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            same = not isinstance(a, bool) and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-12)
        if not same:
            diff[key] = (a, b)
    return diff
