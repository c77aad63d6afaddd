r"""``CompVisCompat``: CompVis' ``DDPM``/``LatentDiffusion`` names on a :class:`~lightning_ldm.mixin.DiffusionMixin`.

Opt in when code written against CompVis reads them (its ``DDIMSampler`` and ``PLMSSampler`` read
``alphas_cumprod``, ``betas``, ``num_timesteps``, ``parameterization``; scripts call ``q_sample`` or
``predict_start_from_noise``; state dicts carry the schedule tables)::

    class LDM(CompVisCompat, LatentDiffusionMixin, L.LightningModule): ...

Everything here reads the module's :attr:`~lightning_ldm.mixin.DiffusionMixin.noise_schedule`: the tables are
read-only attributes that give the schedule's table on the module's device (in the schedule's ``table_dtype``), never
buffers, so precision flags and EMA cannot reach them; the identities are the schedule's. CompVis state dicts that
carry the tables load after each table is compared with ours at the precision it was stored in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

from torch import Tensor
from typing_extensions import override

from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import SCHEDULE_TABLES

if TYPE_CHECKING:
    import lightning.pytorch as L

    class _Base(DiffusionMixin, L.LightningModule): ...

else:
    _Base = object

__all__ = ["CompVisCompat"]


class _ScheduleTable:
    """Read-only attribute ``module.<name>``: the schedule table ``name`` on the module's device."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _ScheduleTable: ...
    @overload
    def __get__(self, obj: CompVisCompat, objtype: type | None = None) -> Tensor: ...
    def __get__(self, obj: CompVisCompat | None, objtype: type | None = None) -> Tensor | _ScheduleTable:
        if obj is None:
            return self
        return obj._require_schedule().table(self.name, obj._schedule_device)

    def __set__(self, obj: CompVisCompat, value: Any) -> None:
        raise AttributeError(f"{self.name} is a table of the noise schedule; call register_schedule(...) to change it")


class CompVisCompat(_Base):
    """CompVis' names on a diffusion module: mix in before the diffusion mixin (``class M(CompVisCompat, ...)``).

    Adds the schedule tables under CompVis' names (``betas``, ``alphas_cumprod``, ..., ``lvlb_weights``;
    ``snr_table`` for the SNR), ``num_timesteps``, ``parameterization``, and the identities ``q_sample``,
    ``predict_start_from_noise``, ``get_v``, ``predict_start_from_z_and_v``, ``predict_eps_from_z_and_v`` and
    ``q_posterior``.
    """

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

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps of the registered schedule."""
        return self._require_schedule().num_timesteps

    @property
    def parameterization(self) -> str:
        """What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``."""
        return self._require_schedule().parameterization

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Diffuse ``x_start`` to ``t`` (:meth:`NoiseSchedule.q_sample`); ``noise`` drawn if ``None``."""
        noise = self.draw_noise(x_start) if noise is None else noise
        return self._require_schedule().q_sample(x_start, t, noise)

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (:meth:`NoiseSchedule.predict_start_from_noise`)."""
        return self._require_schedule().predict_start_from_noise(x_t, t, noise)

    def get_v(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``√ā_t·ε − √(1−ā_t)·x`` (:meth:`NoiseSchedule.get_v`)."""
        return self._require_schedule().get_v(x, noise, t)

    def predict_start_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = √ā_t·x_t − √(1−ā_t)·v`` (:meth:`NoiseSchedule.predict_start_from_v`)."""
        return self._require_schedule().predict_start_from_v(x_t, t, v)

    def predict_eps_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``ε = √ā_t·v + √(1−ā_t)·x_t`` (:meth:`NoiseSchedule.predict_noise_from_v`)."""
        return self._require_schedule().predict_noise_from_v(x_t, t, v)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t−1} | x_t, x_0)`` (:meth:`NoiseSchedule.q_posterior`)."""
        return self._require_schedule().q_posterior(x_start, x_t, t)

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
