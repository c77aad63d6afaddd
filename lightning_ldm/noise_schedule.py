r"""The noise schedule as one object: float64 tables computed once from a config, float32 tables per device.

:class:`NoiseSchedule` computes the tables of :func:`~lightning_ldm.schedules.schedule_tables` from a
:class:`~lightning_ldm.schedule_config.ScheduleConfig` in float64, keeps a float32 (or float64) copy per device, and
offers the noising identities, the posterior, the SNR and the loss weights on top of them.

A ``NoiseSchedule`` is a plain Python object, not an ``nn.Module`` and not a buffer: nothing that torch or Lightning
does to a module (``.half()``, precision flags, EMA averaging, DDP buffer broadcasts, meta-device initialization)
can reach its tables. It needs neither Lightning nor a module::

    schedule = NoiseSchedule(beta_schedule="linear", timesteps=1000, parameterization="v")
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],))
    noise = torch.randn_like(x0)
    loss = (net(schedule.q_sample(x0, t, noise), t) - schedule.get_v(x0, noise, t)).square().mean()
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_ldm import interop, noising
from lightning_ldm._checks import check_choice, check_real, check_timesteps, describe
from lightning_ldm.ops import gather_coefficients
from lightning_ldm.parameterization import LOSS_WEIGHTINGS, LossWeighting, min_snr_weights
from lightning_ldm.schedule_config import ScheduleConfig
from lightning_ldm.schedules import TABLE_NAMES, rescale_zero_terminal_snr, schedule_tables

__all__ = ["SCHEDULE_TABLES", "NoiseSchedule", "ScheduleConfig", "vlb_weights"]

TABLE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
_RENAMED = {"snr": "snr_table"}  # the module's ``snr`` is the method; its table is ``snr_table``
#: The tables of a schedule, by their CompVis names (``snr`` is called ``snr_table``; ``lvlb_weights`` added).
SCHEDULE_TABLES: tuple[str, ...] = (*(_RENAMED.get(n, n) for n in TABLE_NAMES), "lvlb_weights")


def vlb_weights(tables: Mapping[str, np.ndarray], parameterization: str) -> np.ndarray:
    r"""CompVis' ``lvlb_weights``: the per-timestep weight of the VLB term, float64, finite everywhere.

    * eps: ``β² / (2·σ²_post·α·(1 − ā))`` with ``α = 1 − β``;
    * x0: ``0.5·√ā / (2·(1 − ā))`` (CompVis writes ``2. * 1 - ā``, an operator-precedence slip that gives
      ``2 − ā``; we use the intended ``2·(1 − ā)``);
    * v: ones, as CompVis (its v branch is ``ones_like(...)``).

    Then ``w[0] = w[1]`` (CompVis: the posterior variance is 0 at t = 0). Entries that are still not finite take the
    value of the nearest finite entry: with zero-terminal SNR the eps weight divides by ``α_T = 0`` at the last step,
    and leading zero betas give 0/0.

    Args:
        tables: Float64 tables with ``betas``, ``alphas_cumprod`` and ``posterior_variance`` (at least 2 steps).
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.

    Returns:
        Float64 array of T weights.
    """
    betas = np.asarray(tables["betas"], dtype=np.float64)
    abar = np.asarray(tables["alphas_cumprod"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if parameterization == "eps":
            weights = betas**2 / (2.0 * tables["posterior_variance"] * (1.0 - betas) * (1.0 - abar))
        elif parameterization == "x0":
            weights = 0.5 * np.sqrt(abar) / (2.0 * (1.0 - abar))
        else:
            weights = np.ones_like(betas)
    weights = np.array(weights, dtype=np.float64)
    weights[0] = weights[1]
    finite = np.flatnonzero(np.isfinite(weights))
    if finite.size and finite.size < weights.size:
        idx = np.arange(weights.size)
        nearest = np.clip(np.searchsorted(finite, idx), 0, finite.size - 1)
        left = np.clip(nearest - 1, 0, finite.size - 1)
        use_left = np.abs(finite[left] - idx) < np.abs(finite[nearest] - idx)
        weights = weights[np.where(use_left, finite[left], finite[nearest])]
    return weights


class NoiseSchedule:
    r"""A diffusion noise schedule: its tables and the identities built on them, usable from plain PyTorch.

    Build it from a :class:`ScheduleConfig` or from the config's fields::

        NoiseSchedule(ScheduleConfig(beta_schedule="cosine", timesteps=1000))
        NoiseSchedule(beta_schedule="cosine", timesteps=1000, parameterization="v")

    The tables (:data:`SCHEDULE_TABLES`, CompVis names) are computed once in float64; :meth:`table` hands out a
    ``table_dtype`` copy on the device asked for, made once per device. The identities take the device of their
    sample and compute in float32 (see :mod:`lightning_ldm.noising`).

    Args:
        config: The schedule's config; ``None`` to build one from ``fields``.
        table_dtype: ``torch.float32`` (default) or ``torch.float64``: the dtype of the per-device tables.
        **fields: :class:`ScheduleConfig` fields, when ``config`` is ``None``.

    Raises:
        TypeError: ``config`` is not a ``ScheduleConfig``, both ``config`` and ``fields`` are given, or a field has
            the wrong type.
        ValueError: A field or ``table_dtype`` is not accepted, or the schedule gives a non-finite table.
    """

    def __init__(
        self, config: ScheduleConfig | None = None, *, table_dtype: torch.dtype = torch.float32, **fields: Any
    ) -> None:
        if config is None:
            config = ScheduleConfig.from_dict(fields)
        elif fields:
            raise TypeError(f"pass either a ScheduleConfig or its fields, not both (got config and {sorted(fields)})")
        elif not isinstance(config, ScheduleConfig):
            raise TypeError(f"config must be a ScheduleConfig, got {type(config).__name__}")
        if table_dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype={table_dtype!r} is not supported; expected torch.float32 or torch.float64")
        self.config = config
        self.table_dtype = table_dtype
        with torch.device("cpu"):  # host maths, whatever default device the caller set (Trainer.init_module)
            betas = config.make_betas()
            if config.zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            tables = schedule_tables(betas, v_posterior=config.v_posterior)
        tables["snr_table"] = tables.pop("snr")
        tables["lvlb_weights"] = vlb_weights(tables, config.parameterization)
        tables = {name: tables[name] for name in SCHEDULE_TABLES}
        stacked = torch.from_numpy(np.stack(list(tables.values())))
        for name, table in zip(SCHEDULE_TABLES, stacked.to(table_dtype), strict=True):
            if not bool(torch.isfinite(table).all()):
                raise ValueError(
                    f"the schedule gives non-finite {name} in {table_dtype} (betas {betas[:3].tolist()}..."
                    f"{betas[-2:].tolist()}); check the schedule arguments"
                )
        for array in tables.values():
            array.setflags(write=False)
        self._float64: Mapping[str, np.ndarray] = MappingProxyType(tables)
        self._row = {name: i for i, name in enumerate(SCHEDULE_TABLES)}
        self._on_device: dict[torch.device, Tensor] = {torch.device("cpu"): stacked.to(table_dtype)}

    # ------------------------------------------------------------------------------------------------ tables
    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.config.timesteps

    @property
    def parameterization(self) -> str:
        """What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``."""
        return self.config.parameterization

    @property
    def fingerprint(self) -> dict[str, Any]:
        """:meth:`ScheduleConfig.fingerprint` of this schedule's config."""
        return self.config.fingerprint()

    @property
    def tables_float64(self) -> Mapping[str, np.ndarray]:
        """The float64 tables (read-only numpy arrays), by their CompVis names."""
        return self._float64

    def table(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """The table ``name`` in ``table_dtype`` on ``device`` (CPU when ``None``); copied once per device.

        Raises:
            ValueError: ``name`` is not one of :data:`SCHEDULE_TABLES`.
        """
        row = self._row.get(name)
        if row is None:
            check_choice("name", name, SCHEDULE_TABLES)
        device = torch.device("cpu") if device is None else torch.device(device)
        stacked = self._on_device.get(device)
        if stacked is None:
            cpu = self._on_device[torch.device("cpu")]
            if torch.compiler.is_compiling():
                return cpu.to(device)[row]
            with torch.inference_mode(False), torch.no_grad():
                stacked = self._on_device[device] = cpu.to(device)
        return stacked[row]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_on_device"] = {torch.device("cpu"): self._on_device[torch.device("cpu")]}
        state["_float64"] = dict(self._float64)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for array in state["_float64"].values():
            array.setflags(write=False)  # pickle does not keep the flag: the copies must stay read-only too
        state["_float64"] = MappingProxyType(state["_float64"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, table_dtype={self.table_dtype})"

    def stored_table_mismatch(self, name: str, stored: Any) -> str | None:
        """Compare a table stored in a state dict with ours at the stored precision; describe a difference.

        The stored table must equal ours rounded to its dtype (float32, float16 or bfloat16), within one unit in the
        last place of that dtype (a float16 table made from a float32 one is rounded twice) and never closer than
        ``rtol=1e-5, atol=1e-7``.

        Returns:
            ``None`` when they agree, else a sentence that names the dtype compared and the first difference.
        """
        ours = torch.from_numpy(np.array(self._float64[name]))
        if not isinstance(stored, Tensor) or not stored.dtype.is_floating_point or stored.shape != ours.shape:
            return f"is {describe(stored)}; expected a floating tensor of shape {tuple(ours.shape)}"
        stored = stored.detach().to("cpu")
        info = torch.finfo(stored.dtype)
        expected = ours.to(stored.dtype).double()
        close = torch.isclose(
            stored.double(), expected, rtol=max(1e-5, info.eps), atol=max(1e-7, info.smallest_normal * info.eps)
        )
        if bool(close.all()):
            return None
        index = int((~close).nonzero()[0, 0])
        return (
            f"differs at {stored.dtype} precision (the dtype it was stored in) from the registered schedule's: "
            f"index {index} holds {float(stored[index]):.6g}, expected {float(expected[index]):.6g}"
        )

    # -------------------------------------------------------------------------------------------- identities
    def _pair(self, first: str, second: str, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.table(first, device), self.table(second, device)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Diffuse ``x_start`` to timestep ``t``: ``√ā_t·x_start + √(1−ā_t)·noise`` (see :func:`noising.q_sample`)."""
        a, b = self._pair("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", x_start.device)
        return noising.q_sample(x_start, t, noise, a, b)

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε``, in ``x_t``'s dtype."""
        a, b = self._pair("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", x_t.device)
        return noising.predict_start_from_noise(x_t, t, noise, a, b)

    def get_v(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``v = √ā_t·ε − √(1−ā_t)·x0``, in ``noise``'s dtype."""
        a, b = self._pair("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", noise.device)
        return noising.get_v(x_start, noise, t, a, b)

    def predict_start_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = √ā_t·x_t − √(1−ā_t)·v``, in ``x_t``'s dtype."""
        a, b = self._pair("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", x_t.device)
        return noising.predict_start_from_v(x_t, t, v, a, b)

    def predict_noise_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``ε = √ā_t·v + √(1−ā_t)·x_t``, in ``v``'s dtype."""
        a, b = self._pair("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", x_t.device)
        return noising.predict_noise_from_v(x_t, t, v, a, b)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The posterior ``q(x_{t−1} | x_t, x_0)``: mean, variance and clipped log-variance.

        ``mean = c1_t·x_start + c2_t·x_t`` with ``c1 = β√ā_prev/(1 − ā)``, ``c2 = (1 − ā_prev)√α/(1 − ā)``.

        Returns:
            ``(mean, variance, log_variance_clipped)``: the mean in ``x_start``'s dtype, the two others float32 of
            shape ``(B, 1, ..., 1)``.

        Raises:
            TypeError: ``t`` is not an integer tensor, or a sample is not a floating tensor.
            ValueError: ``t`` is out of range or the shapes disagree.
        """
        device = x_t.device
        coef1, coef2 = self._pair("posterior_mean_coef1", "posterior_mean_coef2", device)
        mean = noising.q_posterior_mean(x_start, x_t, t, coef1, coef2)
        variance = gather_coefficients(self.table("posterior_variance", device), t, x_t.ndim)
        log_variance = gather_coefficients(self.table("posterior_log_variance_clipped", device), t, x_t.ndim)
        return mean, variance, log_variance

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``ā_t/(1 − ā_t)`` of each timestep, float32, shape ``(B,)`` (0 at a zero-SNR end).

        Raises:
            TypeError: ``t`` is not an integer tensor.
            ValueError: ``t`` is not 1-D or out of range.
        """
        check_timesteps(t, self.num_timesteps)
        return gather_coefficients(self.table("snr_table", t.device), t, 1)

    def loss_weights(
        self, t: Tensor, loss_weighting: LossWeighting = "none", min_snr_gamma: float = 5.0
    ) -> Tensor | None:
        r"""Per-sample loss weights for timesteps ``t`` (float32, shape ``(B,)``), ``None`` for ``"none"``.

        ``"min_snr"``: :func:`~lightning_ldm.parameterization.min_snr_weights` of :meth:`snr` for this
        parameterization; ``"vlb"``: the ``lvlb_weights`` table (see :func:`vlb_weights`).

        Raises:
            ValueError: ``loss_weighting`` or ``min_snr_gamma`` is not accepted, or ``t`` is out of range.
            TypeError: ``t`` is not an integer tensor.
        """
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        gamma = check_real("min_snr_gamma", min_snr_gamma, minimum=0.0, min_inclusive=False)
        if loss_weighting != "none":
            check_timesteps(t, self.num_timesteps)
        return self._loss_weights(t, loss_weighting, gamma)

    def _loss_weights(self, t: Tensor, loss_weighting: str, gamma: float) -> Tensor | None:
        """:meth:`loss_weights` without validation (the package's internal path: its callers checked the arguments)."""
        if loss_weighting == "none":
            return None
        if loss_weighting == "vlb":
            return gather_coefficients(self.table("lvlb_weights", t.device), t, 1)
        snr = gather_coefficients(self.table("snr_table", t.device), t, 1)
        return min_snr_weights(snr, gamma, self.parameterization)

    # ---------------------------------------------------------------------------------------------- interop
    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers scheduler config of this schedule (see :func:`~lightning_ldm.interop.to_diffusers_config`)."""
        return interop.to_diffusers_config(self.config)

    @classmethod
    def from_diffusers_config(
        cls, config: Mapping[str, Any], *, table_dtype: torch.dtype = torch.float32
    ) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config (see :func:`~lightning_ldm.interop.from_diffusers_config`)."""
        return cls(ScheduleConfig.from_dict(interop.from_diffusers_config(config)), table_dtype=table_dtype)
