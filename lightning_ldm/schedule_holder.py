"""``ScheduleHolder``: the part of ``DiffusionMixin`` that owns a module's noise schedule.

It keeps a :class:`~lightning_ldm.noise_schedule.NoiseSchedule` as a plain attribute (not as buffers), shows its
tables under CompVis' names, and guards checkpoints: our checkpoints carry the schedule's fingerprint (compared on
load), CompVis state dicts that carry the tables load after each table is compared with ours at the precision it was
stored in.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ldm.noise_schedule import SCHEDULE_TABLES, NoiseSchedule, vlb_weights
from lightning_ldm.parameterization import LossWeighting, Parameterization
from lightning_ldm.schedule_config import ScheduleConfig, fingerprint_difference

if TYPE_CHECKING:
    import lightning.pytorch as L

    _Base = L.LightningModule
else:
    _Base = object

__all__ = ["CHECKPOINT_KEY", "ScheduleHolder"]

#: Key of the package's entry in a Lightning checkpoint dict; the fingerprint sits under ``["schedule"]``.
CHECKPOINT_KEY = "lightning_ldm"


class _ScheduleTable:
    """Read-only attribute ``module.<name>``: the schedule table ``name`` on the module's device."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _ScheduleTable: ...
    @overload
    def __get__(self, obj: ScheduleHolder, objtype: type | None = None) -> Tensor: ...
    def __get__(self, obj: ScheduleHolder | None, objtype: type | None = None) -> Tensor | _ScheduleTable:
        if obj is None:
            return self
        return obj.require_schedule().table(self.name, obj.schedule_device)

    def __set__(self, obj: ScheduleHolder, value: Any) -> None:
        raise AttributeError(f"{self.name} is a table of the noise schedule; call register_schedule(...) to change it")


class ScheduleHolder(_Base):
    """A module's noise schedule: registration, CompVis' table names, the checkpoint guard (mix in before nn.Module).

    Attributes: ``noise_schedule`` (set by :meth:`register_schedule`), ``check_schedule_on_load`` (compare the
    schedule of a loaded checkpoint; ``False`` opts out).
    """

    noise_schedule: NoiseSchedule | None = None
    check_schedule_on_load: bool = True
    _pending_schedule_fingerprint: dict[str, Any] | None = None

    betas = _ScheduleTable()
    alphas_cumprod = _ScheduleTable()
    alphas_cumprod_prev = _ScheduleTable()
    sqrt_alphas_cumprod = _ScheduleTable()
    sqrt_one_minus_alphas_cumprod = _ScheduleTable()
    log_one_minus_alphas_cumprod = _ScheduleTable()
    sqrt_recip_alphas_cumprod = _ScheduleTable()
    sqrt_recipm1_alphas_cumprod = _ScheduleTable()
    posterior_variance = _ScheduleTable()
    posterior_log_variance_clipped = _ScheduleTable()
    posterior_mean_coef1 = _ScheduleTable()
    posterior_mean_coef2 = _ScheduleTable()
    snr_table = _ScheduleTable()
    lvlb_weights = _ScheduleTable()

    # ------------------------------------------------------------------------------------------------ schedule
    def register_schedule(
        self,
        given_betas: np.ndarray | Tensor | Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        *,
        zero_terminal_snr: bool = False,
        v_posterior: float = 0.0,
        parameterization: Parameterization = "eps",
        table_dtype: torch.dtype = torch.float32,
        schedule: NoiseSchedule | ScheduleConfig | None = None,
    ) -> None:
        r"""Set the noise schedule (CompVis ``register_schedule`` arguments; see :class:`ScheduleConfig`).

        Args:
            given_betas: Explicit betas; when given, ``beta_schedule``, ``timesteps`` and the schedule parameters are
                ignored, as in CompVis.
            beta_schedule: ``"linear"``, ``"cosine"``, ``"squaredcos_cap_v2"``, ``"sqrt_linear"`` or ``"sqrt"``.
            timesteps: Number of training timesteps T (>= 2).
            linear_start: First beta of the linear-type schedules.
            linear_end: Last beta of the linear-type schedules.
            cosine_s: Offset ``s`` of the cosine schedule.
            zero_terminal_snr: Rescale the betas so the last ``ā`` is 0 (Lin et al. 2023).
            v_posterior: Weight ``v`` of ``β`` in the posterior variance, in [0, 1].
            parameterization: What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
            table_dtype: ``torch.float32`` (default) or ``torch.float64``.
            schedule: A ready :class:`NoiseSchedule` or :class:`ScheduleConfig`, used instead of the arguments above.

        Raises:
            TypeError: The class lists ``DiffusionMixin`` after ``nn.Module``, or an argument has the wrong type.
            ValueError: An argument is not accepted, or the checkpoint loaded before this call holds another schedule.
        """
        self._check_mro()
        if not isinstance(schedule, NoiseSchedule):
            if schedule is None:
                schedule = ScheduleConfig(
                    beta_schedule=beta_schedule,  # type: ignore[arg-type]
                    timesteps=timesteps,
                    linear_start=linear_start,
                    linear_end=linear_end,
                    cosine_s=cosine_s,
                    zero_terminal_snr=zero_terminal_snr,
                    v_posterior=v_posterior,
                    parameterization=parameterization,
                    given_betas=given_betas,  # type: ignore[arg-type]
                )
            schedule = NoiseSchedule(schedule, table_dtype=table_dtype)
        if schedule.config.zero_terminal_snr and schedule.parameterization == "eps":
            rank_zero_warn(
                "register_schedule(zero_terminal_snr=True, parameterization='eps'): at the terminal step ā = 0, so an "
                "ε-prediction carries no information about x0 there and DDIM 'trailing' sampling (which starts there) "
                "refuses it; Lin et al. 2023 pair zero terminal SNR with parameterization='v'",
                category=UserWarning,
            )
        pending = self._pending_schedule_fingerprint
        if pending is not None and self.check_schedule_on_load:
            self._raise_on_mismatch(pending, schedule.fingerprint)
        self.noise_schedule = schedule
        self._pending_schedule_fingerprint = None

    def require_schedule(self) -> NoiseSchedule:
        """The registered :class:`NoiseSchedule`.

        Raises:
            RuntimeError: No schedule is registered.
        """
        if self.noise_schedule is None:
            raise RuntimeError(
                f"{type(self).__name__} has no noise schedule: call self.register_schedule(...) in __init__ first"
            )
        return self.noise_schedule

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps of the registered schedule."""
        return self.require_schedule().num_timesteps

    @property
    def parameterization(self) -> str:
        """What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``."""
        return self.require_schedule().parameterization

    @property
    def schedule_fingerprint(self) -> dict[str, Any]:
        """The registered schedule's fingerprint (see :meth:`ScheduleConfig.fingerprint`); a resume compares it."""
        return self.require_schedule().fingerprint

    @property
    def schedule_table_names(self) -> tuple[str, ...]:
        """The CompVis names of the schedule tables readable on the module."""
        return SCHEDULE_TABLES

    @property
    def schedule_device(self) -> torch.device:
        """Where the module's tables live: the device of its first parameter or buffer (CPU if none, or on meta)."""
        device = getattr(self, "_device", None)  # kept by LightningModule
        if device is None:
            for tensor in (*self.parameters(), *self.buffers()):
                device = tensor.device
                break
        return torch.device("cpu") if device is None or device.type == "meta" else device

    def _check_mro(self) -> None:
        if not isinstance(self, nn.Module):
            raise TypeError(
                f"{type(self).__name__} must subclass torch.nn.Module (e.g. class M(DiffusionMixin, L.LightningModule))"
            )
        mro = type(self).__mro__
        if mro.index(ScheduleHolder) > mro.index(nn.Module):
            raise TypeError(
                f"{type(self).__name__} lists DiffusionMixin after LightningModule/nn.Module, so its hooks never run; "
                "write `class M(DiffusionMixin, L.LightningModule)`"
            )

    # ------------------------------------------------------------------------------------- noising identities
    # (q_sample, which draws its noise when none is given, is DiffusionMixin's)
    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (:meth:`NoiseSchedule.predict_start_from_noise`)."""
        return self.require_schedule().predict_start_from_noise(x_t, t, noise)

    def get_v(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``√ā_t·ε − √(1−ā_t)·x`` (:meth:`NoiseSchedule.get_v`)."""
        return self.require_schedule().get_v(x, noise, t)

    def predict_start_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = √ā_t·x_t − √(1−ā_t)·v`` (:meth:`NoiseSchedule.predict_start_from_v`)."""
        return self.require_schedule().predict_start_from_v(x_t, t, v)

    def predict_eps_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``ε = √ā_t·v + √(1−ā_t)·x_t`` (:meth:`NoiseSchedule.predict_noise_from_v`)."""
        return self.require_schedule().predict_noise_from_v(x_t, t, v)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t−1} | x_t, x_0)`` (:meth:`NoiseSchedule.q_posterior`)."""
        return self.require_schedule().q_posterior(x_start, x_t, t)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio of each timestep, float32 ``(B,)`` (:meth:`NoiseSchedule.snr`)."""
        return self.require_schedule().snr(t)

    def loss_weights(
        self, t: Tensor, loss_weighting: LossWeighting = "none", min_snr_gamma: float = 5.0
    ) -> Tensor | None:
        """Per-sample loss weights, float32 ``(B,)``, ``None`` for ``"none"`` (:meth:`NoiseSchedule.loss_weights`)."""
        return self.require_schedule().loss_weights(t, loss_weighting, min_snr_gamma)

    # ------------------------------------------------------------------------------------ deprecated aliases
    def restore_schedule_tables(self) -> list[str]:
        """Deprecated: the tables are no longer buffers, so nothing can overwrite them; returns ``[]``."""
        warnings.warn(
            "DiffusionMixin.restore_schedule_tables() is deprecated and does nothing: the schedule tables live in "
            "module.noise_schedule, out of reach of EMA and precision casts",
            DeprecationWarning,
            stacklevel=2,
        )
        return []

    @staticmethod
    def vlb_weights_formula(tables: Mapping[str, np.ndarray], parameterization: str) -> np.ndarray:
        """Deprecated alias of :func:`lightning_ldm.noise_schedule.vlb_weights`."""
        warnings.warn(
            "DiffusionMixin.vlb_weights_formula is deprecated; use lightning_ldm.noise_schedule.vlb_weights",
            DeprecationWarning,
            stacklevel=2,
        )
        return vlb_weights(tables, parameterization)

    @override
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Accept CompVis state dicts that carry the tables: compare each at its stored precision, then drop it.

        A differing table is a load error (even with ``strict=False``) unless ``check_schedule_on_load`` is
        ``False``; ``lvlb_weights`` is dropped without comparison (CompVis' x0 weights carry a precedence slip).
        """
        schedule = self.noise_schedule
        for name in SCHEDULE_TABLES:
            stored = state_dict.pop(prefix + name, None)
            if stored is None or schedule is None or not self.check_schedule_on_load or name == "lvlb_weights":
                continue
            problem = schedule.stored_table_mismatch(name, stored)
            if problem is not None:
                error_msgs.append(
                    f"the state dict's schedule table {prefix + name!r} {problem} (set `check_schedule_on_load = "
                    "False` to load it anyway)"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the schedule fingerprint under ``checkpoint["lightning_ldm"]["schedule"]``, then call ``super()``."""
        if self.noise_schedule is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["schedule"] = self.noise_schedule.fingerprint
        super().on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose schedule fingerprint differs from the registered one, then call ``super()``.

        A checkpoint without a fingerprint loads with a warning; if no schedule is registered yet, the comparison
        happens at the next :meth:`register_schedule`. ``check_schedule_on_load = False`` skips it.

        Raises:
            ValueError: The schedules differ; the message lists each differing key with both values.
        """
        if self.check_schedule_on_load:
            entry = checkpoint.get(CHECKPOINT_KEY)
            saved = entry.get("schedule") if isinstance(entry, Mapping) else None
            if saved is None:
                rank_zero_warn(
                    f"The checkpoint has no lightning_ldm schedule fingerprint, so {type(self).__name__} cannot check "
                    "that it was trained with the same noise schedule; loading it as it is.",
                    category=UserWarning,
                )
            elif self.noise_schedule is None:
                self._pending_schedule_fingerprint = dict(saved)
            else:
                self._raise_on_mismatch(saved, self.noise_schedule.fingerprint)
        super().on_load_checkpoint(checkpoint)

    def _raise_on_mismatch(self, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        diff = fingerprint_difference(saved, current)
        if diff:
            lines = "; ".join(f"{key}: checkpoint {a!r}, model {b!r}" for key, (a, b) in diff.items())
            raise ValueError(
                f"The checkpoint was trained with a different noise schedule than {type(self).__name__} registered "
                f"({lines}). Register the checkpoint's schedule, or set `check_schedule_on_load = False` on the "
                "model to load it anyway."
            )
