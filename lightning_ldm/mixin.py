r"""``DiffusionMixin``: the schedule tables, forward noising, training loss and DDIM sampling for a LightningModule.

Mix it in **before** ``LightningModule`` and register a schedule in ``__init__``::

    class Denoiser(DiffusionMixin, L.LightningModule):
        def __init__(self, timesteps: int = 1000):
            super().__init__()
            self.save_hyperparameters()
            self.register_schedule(beta_schedule="linear", timesteps=timesteps)
            self.net = TinyUNet()

        def training_step(self, batch, batch_idx):
            return self.diffusion_loss(self.net, batch)

The mixin has no ``__init__`` (nothing to fight the user's); every Lightning hook it overrides calls ``super()``. Its
state lives in buffers and in a few plain attributes with class-level defaults:

=========================  ==================================================================================
attribute                  meaning
=========================  ==================================================================================
``num_timesteps``          T, the number of training timesteps
``parameterization``       ``"eps"``, ``"x0"`` or ``"v"``: what the network predicts
``timestep_sampler``       ``None`` (uniform) or an object with ``sample(batch_size, num_timesteps, device,
                           generator) -> LongTensor`` (installed by ``ScheduleCallback``)
``diffusion_generator``    ``None`` (global RNG) or the ``torch.Generator`` that timesteps and noise are drawn from
``last_timestep_losses``   ``(t, per-sample loss)`` of the last training :meth:`~DiffusionMixin.diffusion_loss`
``use_checkpoint``         switch for :meth:`~DiffusionMixin.checkpointed`
``check_schedule_on_load`` compare the checkpoint's schedule fingerprint on load (set ``False`` to opt out)
=========================  ==================================================================================

All the maths lives in the functional core (:mod:`lightning_ldm.schedules`, :mod:`lightning_ldm.noising`,
:mod:`lightning_ldm.ddim`, :mod:`lightning_ldm.embedding`, :mod:`lightning_ldm.checkpointing`); the mixin owns the
tables, keeps them in full precision and wires the core into Lightning's hooks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ldm import noising
from lightning_ldm._checks import check_choice, check_int, check_real
from lightning_ldm.checkpointing import checkpoint as _checkpoint
from lightning_ldm.ddim import ddim_sample as _ddim_sample
from lightning_ldm.embedding import SinusoidalTimestepEmbedding
from lightning_ldm.nn import check_timestep_indices, gather_coefficients, mean_flat
from lightning_ldm.schedules import make_beta_schedule, rescale_zero_terminal_snr, schedule_tables

if TYPE_CHECKING:
    import lightning.pytorch as L

    _Base = L.LightningModule
else:
    _Base = object

__all__ = ["DiffusionMixin", "LossType", "LossWeighting", "Parameterization"]

log = logging.getLogger(__name__)

Parameterization = Literal["eps", "x0", "v"]
LossType = Literal["l2", "l1"]
LossWeighting = Literal["none", "min_snr", "vlb"]

PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")
LOSS_TYPES: tuple[str, ...] = ("l2", "l1")
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "vlb")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt")
DDIM_METHODS: tuple[str, ...] = ("uniform", "quad", "linspace", "trailing")
TABLE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

#: Key of the package's entry in a Lightning checkpoint dict; the fingerprint sits under ``["schedule"]``.
CHECKPOINT_KEY = "lightning_ldm"
#: Version of the fingerprint layout (bumped if its keys change meaning).
FINGERPRINT_VERSION = 1

#: Which hyperparameters change the betas of each named schedule (only these go into the fingerprint).
_SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("linear_start", "linear_end"),
    "sqrt_linear": ("linear_start", "linear_end"),
    "sqrt": ("linear_start", "linear_end"),
    "cosine": ("cosine_s",),
    "squaredcos_cap_v2": (),
}

#: Buffer name of the ``snr`` table: the name ``snr`` is the method :meth:`DiffusionMixin.snr`.
_TABLE_RENAMES = {"snr": "snr_table"}


def _betas_to_numpy(given_betas: Any) -> np.ndarray:
    """Convert ``given_betas`` (numpy, torch or a sequence of numbers) to a validated 1-D float64 array."""
    if isinstance(given_betas, Tensor):
        if given_betas.dtype.is_complex or given_betas.dtype == torch.bool:
            raise TypeError(f"given_betas must hold real numbers, got a tensor of dtype {given_betas.dtype}")
        array = given_betas.detach().to("cpu", torch.float64).numpy()
    else:
        if isinstance(given_betas, (str, bytes, Mapping)):
            raise TypeError(
                f"given_betas must be a 1-D sequence, numpy array or tensor of betas, got {type(given_betas).__name__}"
            )
        try:
            array = np.asarray(given_betas, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"given_betas must be a 1-D sequence, numpy array or tensor of real numbers, got {given_betas!r}"
            ) from err
    if array.ndim != 1 or array.shape[0] < 2:
        raise ValueError(f"given_betas must be 1-D with at least 2 betas, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"given_betas must be finite, got {array[~np.isfinite(array)][:4].tolist()} among them")
    invalid = (array < 0.0) | (array > 1.0)
    invalid[:-1] |= array[:-1] >= 1.0
    if invalid.any():
        index = int(invalid.argmax())
        raise ValueError(
            f"given_betas[{index}]={float(array[index])!r} is out of range; expected every beta in [0, 1) (the last "
            "one may be 1: a zero-terminal-SNR schedule)"
        )
    return np.ascontiguousarray(array)


def _betas_hash(betas: np.ndarray) -> str:
    """Short SHA-256 of little-endian float64 betas (stable across platforms)."""
    return hashlib.sha256(np.ascontiguousarray(betas, dtype="<f8").tobytes()).hexdigest()[:16]


def _fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
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


def _expand_batch(value: Tensor, batch_size: int, name: str) -> Tensor:
    if value.ndim == 0 or value.shape[0] not in (1, batch_size):
        raise ValueError(
            f"{name} must have batch size {batch_size} (or 1, broadcast over the batch), got shape {tuple(value.shape)}"
        )
    return value.expand(batch_size, *value.shape[1:]) if value.shape[0] != batch_size else value


def _as_cond_kwargs(value: Tensor | Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Tensor):
        return {"cond": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        f"{name} must be a Tensor (passed as model(..., cond=...)), a mapping of keyword arguments or None, "
        f"got {type(value).__name__}"
    )


class DiffusionMixin(_Base):
    r"""Diffusion training and sampling for a ``LightningModule``: ``class M(DiffusionMixin, L.LightningModule)``.

    The schedule tables are registered as **non-persistent** buffers: they follow ``.to(device)`` and DDP like any
    buffer but stay out of the ``state_dict``, because they are a function of the hyperparameters passed to
    :meth:`register_schedule` (and any change of formula in a later version must not be overwritten by stale numbers
    from an old checkpoint). What guards a resume is the schedule fingerprint that :meth:`on_save_checkpoint` stores
    and :meth:`on_load_checkpoint` compares.

    The tables keep their ``table_dtype`` (float32 or float64) under every precision flag: ``model.half()``,
    ``model.to(torch.bfloat16)`` and Lightning's ``precision="bf16-true"``/``"16-true"`` (which call
    ``module.to(dtype)``) cast the parameters and other buffers but only move the tables between devices. A bf16
    ``√(1 − ā)`` table rounds to 0 at t = 0 and 1, i.e. training on un-noised samples.
    """

    # Class-level defaults: the mixin has no __init__.
    num_timesteps: int
    parameterization: str
    use_checkpoint: bool = False
    checkpoint_use_reentrant: bool = False
    check_schedule_on_load: bool = True
    timestep_sampler: Any = None
    diffusion_generator: torch.Generator | None = None
    last_timestep_losses: tuple[Tensor, Tensor] | None = None
    _schedule_buffer_names: tuple[str, ...] = ()
    _exact_schedule_tables: dict[str, Tensor] = {}  # noqa: RUF012 - replaced per instance by register_schedule
    _schedule_fingerprint: dict[str, Any] | None = None
    _pending_schedule_fingerprint: dict[str, Any] | None = None

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
    ) -> None:
        r"""Compute the schedule tables in float64 and register them as buffers (CompVis ``DDPM`` names).

        Registers every table of :func:`lightning_ldm.schedules.schedule_tables` (``betas``, ``alphas_cumprod``,
        ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
        ``log_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
        ``posterior_variance``, ``posterior_log_variance_clipped``, ``posterior_mean_coef1``,
        ``posterior_mean_coef2``; the ``snr`` table as ``snr_table``) plus CompVis' ``lvlb_weights`` for the chosen
        parameterization (see :meth:`vlb_weights_formula`). Calling it again replaces the schedule (the tables stay
        on the module's device).

        Args:
            given_betas: Explicit betas (numpy array, tensor or sequence); when given, ``beta_schedule``,
                ``timesteps``, ``linear_start``, ``linear_end`` and ``cosine_s`` are ignored, as in CompVis.
            beta_schedule: One of ``"linear"``, ``"cosine"``, ``"squaredcos_cap_v2"``, ``"sqrt_linear"``, ``"sqrt"``
                (see :func:`lightning_ldm.schedules.make_beta_schedule`).
            timesteps: Number of training timesteps T.
            linear_start: First beta of the linear-type schedules.
            linear_end: Last beta of the linear-type schedules.
            cosine_s: Offset ``s`` of the cosine schedule.
            zero_terminal_snr: Rescale the betas so the last ``ā`` is 0 (Lin et al. 2023).
            v_posterior: Weight ``v`` of ``β`` in the posterior variance ``(1 − v)·β̃ + v·β``, in [0, 1].
            parameterization: What the network predicts: ``"eps"`` (noise), ``"x0"`` (clean sample) or ``"v"``.
            table_dtype: ``torch.float32`` (default) or ``torch.float64``.

        Raises:
            TypeError: The class does not list ``DiffusionMixin`` before ``nn.Module``/``LightningModule``,
                ``given_betas`` is not numeric, ``zero_terminal_snr`` is not a bool, or a number has the wrong type.
            ValueError: An argument is out of range or not among the accepted choices, or the checkpoint loaded
                before this call holds a different schedule.
        """
        self._check_mro()
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if table_dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype={table_dtype!r} is not supported; expected torch.float32 or torch.float64")
        if not isinstance(zero_terminal_snr, bool):
            raise TypeError(f"zero_terminal_snr must be a bool, got {zero_terminal_snr!r}")
        v_posterior = check_real("v_posterior", v_posterior, minimum=0.0, maximum=1.0)
        if zero_terminal_snr and parameterization == "eps":
            rank_zero_warn(
                "register_schedule(zero_terminal_snr=True, parameterization='eps'): at the terminal step ā = 0, so an "
                "ε-prediction carries no information about x0 there and DDIM 'trailing' sampling (which starts there) "
                "refuses it; Lin et al. 2023 pair zero terminal SNR with parameterization='v'",
                category=UserWarning,
            )

        fingerprint: dict[str, Any] = {"version": FINGERPRINT_VERSION}
        # Host maths: shield the core's torch calls from a default-device context (Trainer.init_module on a GPU).
        with torch.device("cpu"):
            if given_betas is not None:
                betas = _betas_to_numpy(given_betas)
                fingerprint.update(
                    beta_schedule="given", timesteps=int(betas.shape[0]), betas_sha256=_betas_hash(betas)
                )
            else:
                check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
                timesteps = check_int("timesteps", timesteps, minimum=1)
                params = {"linear_start": linear_start, "linear_end": linear_end, "cosine_s": cosine_s}
                betas = make_beta_schedule(beta_schedule, timesteps, **params)
                fingerprint.update(beta_schedule=beta_schedule, timesteps=int(betas.shape[0]))
                fingerprint.update({k: float(params[k]) for k in _SCHEDULE_PARAMS[beta_schedule]})
            if zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            tables = schedule_tables(betas, v_posterior=v_posterior)
        fingerprint.update(
            zero_terminal_snr=zero_terminal_snr, v_posterior=v_posterior, parameterization=parameterization
        )
        tables = {_TABLE_RENAMES.get(name, name): value for name, value in tables.items()}
        tables["lvlb_weights"] = self.vlb_weights_formula(tables, parameterization)
        for name, value in tables.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"the schedule gives non-finite {name} (betas {betas[:3].tolist()}...{betas[-2:].tolist()}); "
                    "check given_betas / the schedule arguments"
                )

        pending = self._pending_schedule_fingerprint
        if pending is not None and self.check_schedule_on_load:
            self._raise_on_mismatch(pending, fingerprint)

        device = self._schedule_device()
        for name in self._schedule_buffer_names:
            if name not in tables:
                del self._buffers[name]
        for name, value in tables.items():
            self.register_buffer(name, torch.from_numpy(value).to(device=device, dtype=table_dtype), persistent=False)
        self._schedule_buffer_names = tuple(tables)
        self._exact_schedule_tables = {
            name: torch.from_numpy(value).to(dtype=table_dtype) for name, value in tables.items()
        }
        self._schedule_fingerprint = fingerprint
        self._pending_schedule_fingerprint = None
        self.num_timesteps = int(betas.shape[0])
        self.parameterization = parameterization

    @staticmethod
    def vlb_weights_formula(tables: Mapping[str, np.ndarray], parameterization: str) -> np.ndarray:
        r"""CompVis' ``lvlb_weights``: the per-timestep weight of the VLB term, float64, finite everywhere.

        * eps: ``β² / (2·σ²_post·α·(1 − ā))`` with ``α = 1 − β``;
        * x0: ``0.5·√ā / (2·(1 − ā))`` (CompVis writes ``2. * 1 - ā``, an operator-precedence slip that gives
          ``2 − ā``; we use the intended ``2·(1 − ā)``);
        * v: ones, as CompVis (its v branch is ``ones_like(...)``; the exact ELBO weight would be the eps weight
          times ``ā``, since ``ε̂ − ε = √ā·(v̂ − v)``). Kept for parity.

        Then ``w[0] = w[1]`` (CompVis: the posterior variance is 0 at t = 0). Entries that are still not finite take
        the value of the nearest finite entry: with zero-terminal SNR the eps weight divides by ``α_T = 0`` at the
        last step (it becomes ``w[T − 2]``, the mirror of CompVis' first-step fix), and leading zero betas give 0/0.

        Args:
            tables: Float64 tables with ``betas``, ``alphas_cumprod`` and ``posterior_variance``.
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
            nearest = np.clip(np.searchsorted(finite, np.arange(weights.size)), 0, finite.size - 1)
            left = np.clip(nearest - 1, 0, finite.size - 1)
            idx = np.arange(weights.size)
            use_left = np.abs(finite[left] - idx) < np.abs(finite[nearest] - idx)
            weights = weights[np.where(use_left, finite[left], finite[nearest])]
        return weights

    @property
    def schedule_fingerprint(self) -> dict[str, Any]:
        """A small JSON-able description of the registered schedule (what a checkpoint stores to guard a resume).

        Keys: ``version``, ``beta_schedule`` (``"given"`` for explicit betas), ``timesteps``, the parameters that the
        named schedule uses (``linear_start``/``linear_end`` or ``cosine_s``) or ``betas_sha256`` for given betas,
        ``zero_terminal_snr``, ``v_posterior``, ``parameterization``. ``table_dtype`` is not part of it.

        Raises:
            RuntimeError: No schedule is registered.
        """
        if self._schedule_fingerprint is None:
            self._require_schedule()
        return dict(self._schedule_fingerprint or {})

    def _check_mro(self) -> None:
        if not isinstance(self, nn.Module):
            raise TypeError(
                f"{type(self).__name__} must subclass torch.nn.Module (e.g. class M(DiffusionMixin, L.LightningModule))"
            )
        mro = type(self).__mro__
        if mro.index(DiffusionMixin) > mro.index(nn.Module):
            raise TypeError(
                f"{type(self).__name__} lists DiffusionMixin after LightningModule/nn.Module, so its hooks and table "
                "handling never run; write `class M(DiffusionMixin, L.LightningModule)`"
            )

    def _require_schedule(self) -> None:
        if "alphas_cumprod" not in self._buffers:
            raise RuntimeError(
                f"{type(self).__name__} has no noise schedule: call self.register_schedule(...) in __init__ first"
            )

    def _schedule_device(self) -> torch.device:
        """The device for new tables: the old tables', else the module's (CPU for a module on the meta device)."""
        table = self._buffers.get("alphas_cumprod")
        device = table.device if table is not None else None
        if device is None:
            for tensor in (*self.parameters(), *self.buffers()):
                device = tensor.device
                break
        if device is None or device.type == "meta":
            return torch.device("cpu")
        return device

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        """Apply ``fn`` like ``nn.Module._apply``, but let the schedule tables take only the device ``fn`` gives.

        Each table is replaced by its original values moved to the device of ``fn(table)``: a dtype cast
        (``.half()``, ``.to(torch.bfloat16)``, Lightning's true-half precision) would round them, and ``to_empty``
        (materializing a model built on the meta device) would leave them uninitialized. A table that ``fn``
        returns unchanged (in-place functions such as ``share_memory_``) is kept as it is; one that was itself on
        the meta device takes what ``fn`` gives.
        """
        originals = {name: self._buffers[name] for name in self._schedule_buffer_names if name in self._buffers}
        result = super()._apply(fn, recurse)
        for name, original in originals.items():
            applied = self._buffers[name]
            if applied is None or original is None or applied is original or original.is_meta:
                continue
            self._buffers[name] = original.to(device=applied.device)
        return result

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
        """Accept state dicts that carry the tables (CompVis ``DDPM`` keeps them persistent): compare, then drop.

        A stored table that differs from the registered one (beyond float32 rounding) is reported as a load error
        unless :attr:`check_schedule_on_load` is ``False``; ``lvlb_weights`` is dropped without comparison (CompVis'
        x0 weights carry an operator-precedence slip, see :meth:`vlb_weights_formula`).
        """
        for name in self._schedule_buffer_names:
            stored = state_dict.pop(prefix + name, None)
            if stored is None or not self.check_schedule_on_load or name == "lvlb_weights":
                continue
            ours = self._buffers[name]
            same = (
                isinstance(stored, Tensor)
                and ours is not None
                and stored.shape == ours.shape
                and torch.allclose(stored.to("cpu", torch.float64), ours.to("cpu", torch.float64), rtol=1e-5, atol=1e-7)
            )
            if not same:
                error_msgs.append(
                    f"the state dict's schedule table {prefix + name!r} differs from the schedule "
                    f"{type(self).__name__} registered (set `check_schedule_on_load = False` to load it anyway)"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------------------------- noising identities
    def _table(self, name: str) -> Tensor:
        table = self._buffers.get(name)
        if table is None:
            self._require_schedule()
            raise RuntimeError(f"schedule table {name!r} is missing")  # pragma: no cover - defensive
        return table

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Diffuse ``x_start`` to timestep ``t``: ``√ā_t·x_start + √(1−ā_t)·noise`` (see :func:`noising.q_sample`).

        Args:
            x_start: Clean samples, batch first, any floating dtype.
            t: 1-D integer timesteps, one per sample, on the tables' device.
            noise: Standard normal noise of ``x_start``'s shape; drawn with :meth:`sample_noise` when ``None``.

        Returns:
            Noisy samples in ``x_start``'s dtype (coefficients used in float32).

        Raises:
            TypeError: ``t`` is not an integer tensor.
            ValueError: ``t`` is out of range or the shapes disagree.
            RuntimeError: No schedule is registered.
        """
        if noise is None:
            noise = self.sample_noise(x_start)
        return noising.q_sample(
            x_start, t, noise, self._table("sqrt_alphas_cumprod"), self._table("sqrt_one_minus_alphas_cumprod")
        )

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε``, in ``x_t``'s dtype (errors as :meth:`q_sample`)."""
        return noising.predict_start_from_noise(
            x_t, t, noise, self._table("sqrt_recip_alphas_cumprod"), self._table("sqrt_recipm1_alphas_cumprod")
        )

    def get_v(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``v = √ā_t·ε − √(1−ā_t)·x``, in ``noise``'s dtype (errors as :meth:`q_sample`)."""
        return noising.get_v(
            x, noise, t, self._table("sqrt_alphas_cumprod"), self._table("sqrt_one_minus_alphas_cumprod")
        )

    def predict_start_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = √ā_t·x_t − √(1−ā_t)·v``, in ``x_t``'s dtype (errors as :meth:`q_sample`)."""
        return noising.predict_start_from_v(
            x_t, t, v, self._table("sqrt_alphas_cumprod"), self._table("sqrt_one_minus_alphas_cumprod")
        )

    def predict_eps_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``ε = √ā_t·v + √(1−ā_t)·x_t``, in ``v``'s dtype (errors as :meth:`q_sample`)."""
        return noising.predict_noise_from_v(
            x_t, t, v, self._table("sqrt_alphas_cumprod"), self._table("sqrt_one_minus_alphas_cumprod")
        )

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The posterior ``q(x_{t−1} | x_t, x_0)``: mean, variance and clipped log-variance.

        ``mean = c1_t·x_start + c2_t·x_t`` with ``c1 = β√ā_prev/(1 − ā)``, ``c2 = (1 − ā_prev)√α/(1 − ā)``.

        Returns:
            ``(mean, variance, log_variance_clipped)``: the mean in ``x_start``'s dtype, the two others float32 of
            shape ``(B, 1, ..., 1)`` (coefficients, like CompVis' ``extract_into_tensor`` results).

        Raises:
            TypeError: ``t`` is not an integer tensor.
            ValueError: ``t`` is out of range or the shapes disagree.
            RuntimeError: No schedule is registered.
        """
        coef1, coef2 = self._table("posterior_mean_coef1"), self._table("posterior_mean_coef2")
        check_timestep_indices(t, coef1.shape[0])
        if x_start.shape != x_t.shape or x_start.ndim < 1 or x_start.shape[0] != t.shape[0]:
            raise ValueError(
                f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} must have the same shape, batch "
                f"{t.shape[0]} (the number of timesteps)"
            )
        mean = noising.combine(t, coef1, x_start, coef2, x_t)
        variance = gather_coefficients(self._table("posterior_variance"), t, x_t.ndim)
        log_variance = gather_coefficients(self._table("posterior_log_variance_clipped"), t, x_t.ndim)
        return mean, variance, log_variance

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``ā_t/(1 − ā_t)`` of each timestep, float32, shape ``(B,)`` (0 at a zero-SNR end).

        Raises:
            TypeError: ``t`` is not an integer tensor.
            ValueError: ``t`` is not 1-D or out of range.
            RuntimeError: No schedule is registered.
        """
        table = self._table("snr_table")
        check_timestep_indices(t, table.shape[0])
        return gather_coefficients(table, t, 1)

    # ----------------------------------------------------------------------------------------- random draws
    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Draw one training timestep per sample.

        Uniform on ``[0, T)`` unless a :attr:`timestep_sampler` is installed, in which case its
        ``sample(batch_size, num_timesteps, device, generator)`` is used; draws from :attr:`diffusion_generator`
        when one is set (a generator on another device draws there and the result is moved).

        Args:
            batch_size: Number of timesteps.
            device: Device of the result (the tables' device when ``None``).

        Returns:
            LongTensor of shape ``(batch_size,)``.

        Raises:
            ValueError: The installed sampler returned something that is not a ``(batch_size,)`` integer tensor.
            RuntimeError: No schedule is registered.
        """
        table = self._table("alphas_cumprod")
        target = torch.device(device) if device is not None else table.device
        generator = self.diffusion_generator
        if self.timestep_sampler is not None:
            t = self.timestep_sampler.sample(batch_size, self.num_timesteps, target, generator)
            if not isinstance(t, Tensor) or t.shape != (batch_size,) or t.dtype.is_floating_point:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"timestep_sampler {type(self.timestep_sampler).__name__}.sample returned {shape}; expected a "
                    f"LongTensor of shape ({batch_size},)"
                )
            return t.to(device=target, dtype=torch.long)
        draw_device = generator.device if generator is not None else target
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=draw_device, generator=generator)
        return t.to(target)

    def sample_noise(self, like: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of ``like``'s shape, drawn in float32 from :attr:`diffusion_generator` if set.

        Drawing in float32 and then casting gives the same noise (up to rounding) under every precision flag.

        Args:
            like: Tensor whose shape and device the noise takes.
            dtype: Dtype of the result (``like``'s dtype when ``None``).

        Returns:
            Noise tensor.
        """
        generator = self.diffusion_generator
        draw_device = generator.device if generator is not None else like.device
        noise = torch.randn(like.shape, device=draw_device, dtype=torch.float32, generator=generator)
        return noise.to(device=like.device, dtype=like.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------------------------------------ loss
    def loss_weights(
        self, t: Tensor, loss_weighting: LossWeighting = "none", min_snr_gamma: float = 5.0
    ) -> Tensor | None:
        r"""Per-sample loss weights for timesteps ``t`` (float32, shape ``(B,)``), ``None`` for ``"none"``.

        ``"min_snr"`` (Min-SNR-γ, Hang et al. 2023) depends on the parameterization; with ``s = snr(t)``:

        * eps: ``min(s, γ)/s = γ/max(s, γ)`` (1 where ``s ≤ γ``);
        * x0: ``min(s, γ)``;
        * v: ``min(s, γ)/(s + 1)``;

        and weight 1 where ``s = 0`` (the terminal step of a zero-terminal-SNR schedule), as diffusers' training
        scripts do: the x0 and v formulas give 0 there, which would never train the step that zero-terminal-SNR
        sampling starts from.

        ``"vlb"``: the ``lvlb_weights`` table (see :meth:`vlb_weights_formula`).

        Raises:
            ValueError: ``loss_weighting`` or ``min_snr_gamma`` is not accepted.
        """
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        gamma = check_real("min_snr_gamma", min_snr_gamma, minimum=0.0, min_inclusive=False)
        if loss_weighting == "none":
            return None
        if loss_weighting == "vlb":
            return gather_coefficients(self._table("lvlb_weights"), t, 1)
        snr = gather_coefficients(self._table("snr_table"), t, 1)
        clipped = snr.clamp(max=gamma)
        if self.parameterization == "eps":
            weights = gamma / snr.clamp(min=gamma)
        elif self.parameterization == "x0":
            weights = clipped
        else:
            weights = clipped / (snr + 1.0)
        return torch.where(snr == 0, torch.ones_like(weights), weights)

    def diffusion_loss(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        loss_type: LossType = "l2",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ) -> Tensor:
        r"""The denoising loss: noise ``x_start``, run ``model(x_t, t, **model_kwargs)``, compare with the target.

        The target follows :attr:`parameterization`: eps → ``noise``, x0 → ``x_start``, v → :meth:`get_v`. The
        per-sample loss is ``w_t·mean_flat(|out − target|^p)`` (p = 2 for ``"l2"``, 1 for ``"l1"``) computed in
        float32 whatever the model's dtype or autocast; the result is its mean. When ``t`` is drawn here by an installed
        :attr:`timestep_sampler` whose ``importance_weights(t, T)`` returns weights (``1/(T·p(t))``, e.g.
        ``LossAwareSampler``), the mean is taken of the per-sample losses times those weights, so the loss stays an
        unbiased estimate of the uniform-``t`` objective. When the module is in training mode, ``(t, per-sample
        loss)`` (detached, float32, before the importance weights, which is what a loss-aware sampler learns from)
        is kept in :attr:`last_timestep_losses` for callbacks.

        Args:
            model: The network, called as ``model(x_t, t, **model_kwargs)``.
            x_start: Clean samples ``(B, ...)``.
            t: Timesteps ``(B,)``; drawn with :meth:`sample_timesteps` when ``None``.
            noise: Noise of ``x_start``'s shape; drawn (float32) with :meth:`sample_noise` when ``None``.
            model_kwargs: Extra keyword arguments for ``model`` (e.g. conditioning).
            loss_type: ``"l2"`` or ``"l1"``.
            loss_weighting: ``"none"``, ``"min_snr"`` or ``"vlb"`` (see :meth:`loss_weights`).
            min_snr_gamma: γ of Min-SNR weighting, > 0.
            offset_noise: Scale of the offset noise added to ``noise``: ``noise + offset·n`` with ``n ~ N(0, 1)`` of
                shape ``(B, C, 1, ..., 1)`` (one value per sample and channel).

        Returns:
            Scalar float32 loss.

        Raises:
            ValueError: A choice or number is not accepted, ``x_start`` has no batch dimension, ``t``/``noise`` do not
                fit ``x_start``, or the model output's shape differs from the target's.
            TypeError: ``t`` is not an integer tensor.
        """
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        check_real("min_snr_gamma", min_snr_gamma, minimum=0.0, min_inclusive=False)
        offset_noise = check_real("offset_noise", offset_noise, minimum=0.0)
        if not isinstance(x_start, Tensor) or x_start.ndim < 1 or not x_start.dtype.is_floating_point:
            raise ValueError("x_start must be a floating tensor with a batch dimension")
        batch = x_start.shape[0]
        drawn = t is None
        if t is None:
            t = self.sample_timesteps(batch, device=x_start.device)
        else:
            check_timestep_indices(t, self.num_timesteps)
            if t.shape[0] != batch:
                raise ValueError(f"t has {t.shape[0]} timesteps but x_start has batch size {batch}")
        if noise is None:
            noise = self.sample_noise(x_start, dtype=torch.float32)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        if offset_noise > 0.0:
            if x_start.ndim < 2:
                raise ValueError("offset_noise needs samples with a channel dimension (B, C, ...)")
            shape = (batch, x_start.shape[1]) + (1,) * (x_start.ndim - 2)
            offset = self.sample_noise(x_start.new_empty(shape), dtype=torch.float32)
            noise = noise + offset_noise * offset

        sqrt_abar, sqrt_1m_abar = self._table("sqrt_alphas_cumprod"), self._table("sqrt_one_minus_alphas_cumprod")
        x_t = noising.q_sample(x_start, t, noise, sqrt_abar, sqrt_1m_abar, validate=False)
        out = model(x_t, t, **dict(model_kwargs or {}))
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x_start
        else:
            target = noising.get_v(x_start, noise, t, sqrt_abar, sqrt_1m_abar, validate=False)
        if out.shape != target.shape:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)}, the {self.parameterization!r} target "
                f"{tuple(target.shape)}"
            )
        with _autocast_off(out.device.type):
            error = out.float() - target.float()
            elementwise = error.square() if loss_type == "l2" else error.abs()
            per_sample = mean_flat(elementwise)
            weights = self.loss_weights(t, loss_weighting, min_snr_gamma)
            if weights is not None:
                per_sample = per_sample * weights
            loss = per_sample.mean()
            if drawn and self.timestep_sampler is not None:
                importance = getattr(self.timestep_sampler, "importance_weights", None)
                scale = importance(t, self.num_timesteps) if importance is not None else None
                if scale is not None:
                    loss = (per_sample * scale.to(device=per_sample.device, dtype=torch.float32)).mean()
        if self.training:
            self.last_timestep_losses = (t.detach(), per_sample.detach())
        return loss

    # --------------------------------------------------------------------------- embedding and checkpointing
    def embed_timesteps(self, t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        """Sinusoidal embedding of ``t`` (float32, ``(B, dim)``, cos first) from a cached module per ``(dim, period)``.

        The cached :class:`~lightning_ldm.embedding.SinusoidalTimestepEmbedding` modules are kept outside the module
        tree: not in the ``state_dict``, not cast by precision flags.
        """
        cache: dict[tuple[int, float], nn.Module] | None = self.__dict__.get("_ldm_embedders")
        if cache is None:
            cache = {}
            self.__dict__["_ldm_embedders"] = cache
        key = (check_int("dim", dim, minimum=1), check_real("max_period", max_period, minimum=0.0, min_inclusive=False))
        embedder = cache.get(key)
        if embedder is None:
            embedder = SinusoidalTimestepEmbedding(dim, max_period=max_period)
            cache[key] = embedder
        return embedder(t)

    def checkpointed(
        self,
        func: Callable[..., Any],
        *inputs: Any,
        params: Iterable[Tensor] | None = None,
        use_reentrant: bool | None = None,
    ) -> Any:
        """Run ``func(*inputs)`` through :func:`lightning_ldm.checkpoint` when :attr:`use_checkpoint` is on.

        The non-reentrant variant is the default (:attr:`checkpoint_use_reentrant` = ``False``): it works with DDP's
        ``find_unused_parameters=True`` (the reentrant one fails there with "marked as ready twice") and gives
        gradients to every parameter ``func`` uses. With ``use_reentrant=True`` (the seed's ``CheckpointFunction``)
        only ``params`` get gradients: by default the parameters of ``func`` if it is a module, of its module if it is
        a bound method of one, else all of this module's parameters.

        Args:
            func: Callable to run.
            *inputs: Its positional inputs.
            params: Parameters the reentrant checkpoint must give gradients to (see above for the default).
            use_reentrant: Override :attr:`checkpoint_use_reentrant` for this call.

        Returns:
            ``func(*inputs)``.
        """
        flag = bool(self.use_checkpoint)
        reentrant = self.checkpoint_use_reentrant if use_reentrant is None else use_reentrant
        if params is None:
            params = self._checkpoint_params(func) if flag and reentrant else ()
        return _checkpoint(func, inputs, tuple(params), flag, use_reentrant=reentrant)

    def _checkpoint_params(self, func: Callable[..., Any]) -> Iterator[Tensor]:
        if isinstance(func, nn.Module):
            return func.parameters()
        owner = getattr(func, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner.parameters()
        return self.parameters()

    # ----------------------------------------------------------------------------------------------- sampling
    def _precision_context(self) -> contextlib.AbstractContextManager[Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return contextlib.nullcontext()
        return trainer.precision_plugin.forward_context()

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Callable[..., Tensor],
        shape: Sequence[int],
        *,
        num_steps: int = 50,
        method: str = "uniform",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        cond: Tensor | Mapping[str, Any] | None = None,
        uncond: Tensor | Mapping[str, Any] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        return_intermediates: bool = False,
        x_T: Tensor | None = None,  # noqa: N803 (the DDIM papers' and the core's name)
        clip_x0: float | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        r"""Sample with DDIM (:func:`lightning_ldm.ddim.ddim_sample`) from ``model``, optionally with guidance.

        The model is called as ``model(x_t, t, **model_kwargs, **cond_kwargs)``: a tensor ``cond`` is passed as the
        keyword ``cond=``, a mapping is merged into the keyword arguments (e.g. ``{"context": emb}``). With
        ``guidance_scale`` s ≠ 1 (classifier-free guidance) the unconditional and conditional branches run as one
        batch of 2B (``uncond`` first; ``cond``/``uncond`` tensors of batch 1 are broadcast, and tensors in
        ``model_kwargs`` with batch B are repeated) and the output is ``out_u + s·(out_c − out_u)`` in float32. With
        s = 1 only the conditional branch runs.

        Runs under ``torch.no_grad()`` with ``model`` in eval mode (its modes are restored afterwards) and, when the
        module is attached to a Trainer, under ``trainer.precision_plugin.forward_context()`` (autocast for
        ``"bf16-mixed"``/``"16-mixed"``, the default dtype for true-half). ``x_T`` is drawn in float32 from
        ``generator`` (the global RNG when ``None``; never :attr:`diffusion_generator`, so sampling does not shift the
        training draws) and cast to the default dtype of that context.

        Args:
            model: The network.
            shape: Shape of the samples, batch first.
            num_steps: Number of DDIM steps.
            method: ``"uniform"``, ``"quad"``, ``"linspace"`` or ``"trailing"``.
            eta: DDIM η (0: deterministic).
            generator: Generator for ``x_T`` and the η noise.
            guidance_scale: Classifier-free guidance scale s.
            cond: Conditioning (tensor or keyword mapping).
            uncond: Unconditional conditioning, needed when s ≠ 1.
            model_kwargs: Keyword arguments for every model call.
            return_intermediates: Also return ``{"x_inter": [...], "pred_x0": [...]}``.
            x_T: Starting noise (drawn when ``None``); its shape must equal ``shape``.
            clip_x0: Clamp the predicted x0 to ``[-clip_x0, clip_x0]`` (no clamp when ``None``).

        Returns:
            Samples (in ``x_T``'s dtype), or ``(samples, intermediates)``.

        Raises:
            ValueError: Guidance without ``uncond``/``cond``, a conditioning tensor of the wrong batch size, an ``x_T``
                of another shape, or an argument rejected by the DDIM core.
            TypeError: ``cond``/``uncond`` is neither a tensor, a mapping nor ``None``.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"shape must start with a positive batch size, got {shape}")
        scale = check_real("guidance_scale", guidance_scale)
        batch = shape[0]
        cond_kw = _as_cond_kwargs(cond, "cond")
        uncond_kw = _as_cond_kwargs(uncond, "uncond")
        base_kw = dict(model_kwargs or {})
        guided = scale != 1.0
        if guided:
            if uncond is None or cond is None:
                raise ValueError(
                    f"guidance_scale={scale:g} needs both cond and uncond (the unconditional input, e.g. a null "
                    "embedding); pass guidance_scale=1.0 for unguided sampling"
                )
            if set(cond_kw) != set(uncond_kw):
                raise ValueError(
                    f"cond and uncond must name the same keywords, got {sorted(cond_kw)} and {sorted(uncond_kw)}"
                )
            pair_kw = dict(base_kw)
            for key, value in base_kw.items():
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
                    pair_kw[key] = torch.cat([value, value])
            for key in cond_kw:
                c, u = cond_kw[key], uncond_kw[key]
                if isinstance(c, Tensor) and isinstance(u, Tensor):
                    pair_kw[key] = torch.cat(
                        [_expand_batch(u, batch, f"uncond[{key!r}]"), _expand_batch(c, batch, f"cond[{key!r}]")]
                    )
                else:
                    raise TypeError(
                        f"cond[{key!r}] and uncond[{key!r}] must be tensors to batch them, got "
                        f"{type(c).__name__} and {type(u).__name__}"
                    )
        single_kw = {**base_kw, **cond_kw}
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected shape {shape}")

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            if not guided:
                return model(x, t, **single_kw)
            out = model(torch.cat([x, x]), torch.cat([t, t]), **pair_kw)
            out_u, out_c = out.float().chunk(2)
            return out_u + scale * (out_c - out_u)

        modules = list(model.modules()) if isinstance(model, nn.Module) else []
        modes = [m.training for m in modules]
        if isinstance(model, nn.Module):
            model.eval()
        try:
            with self._precision_context():
                device = self._table("alphas_cumprod").device
                if x_T is None:
                    draw_device = generator.device if generator is not None else device
                    x_T = torch.randn(shape, device=draw_device, dtype=torch.float32, generator=generator)
                    x_T = x_T.to(device=device, dtype=torch.get_default_dtype())
                else:
                    x_T = x_T.to(device)
                sampler: Callable[..., Any] = _ddim_sample  # one call for both overloads
                return sampler(
                    model_fn,
                    x_T,
                    self._table("alphas_cumprod"),
                    num_steps=num_steps,
                    method=method,
                    eta=eta,
                    parameterization=self.parameterization,
                    generator=generator,
                    clip_x0=clip_x0,
                    return_intermediates=return_intermediates,
                )
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode

    # ------------------------------------------------------------------------------ exact tables under EMA
    @property
    def schedule_table_names(self) -> tuple[str, ...]:
        """Names of the schedule-table buffers that :meth:`register_schedule` registered."""
        return self._schedule_buffer_names

    def restore_schedule_tables(self) -> list[str]:
        """Put back the exact schedule tables wherever something wrote other values into them; return their names.

        ``EMAWeightAveraging(use_buffers=True)`` averages every buffer, the tables included: its average of a
        constant drifts by float32 rounding (measured: 3e-5 on the SNR table after 8 steps at decay 0.9), it swaps
        that average in for validation and copies it into the module at the end of training. The tables are a
        function of the schedule, so the mixin puts them back at the start of every validation epoch and at the end
        of training (its hooks run after the callbacks').
        """
        restored = []
        for name, exact in self._exact_schedule_tables.items():
            current = self._buffers.get(name)
            if current is not None and not torch.equal(current, exact.to(current.device)):
                current.copy_(exact)
                restored.append(name)
        if restored:
            log.debug("restored the exact schedule tables %s", restored)
        return restored

    def on_validation_epoch_start(self) -> None:
        """Restore exact schedule tables a weight-averaging callback may have swapped in."""
        super().on_validation_epoch_start()
        self.restore_schedule_tables()

    def on_train_end(self) -> None:
        """Restore exact schedule tables a weight-averaging callback may have copied in."""
        super().on_train_end()
        self.restore_schedule_tables()

    # ------------------------------------------------------------------------------------ checkpoint hooks
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store :attr:`schedule_fingerprint` under ``checkpoint["lightning_ldm"]["schedule"]``, then call ``super()``.

        Runs in the module's own hook, so ``ModelCheckpoint(save_weights_only=True)`` checkpoints carry it too. A
        subclass that overrides this hook must call ``super().on_save_checkpoint(checkpoint)``.
        """
        if self._schedule_fingerprint is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["schedule"] = dict(self._schedule_fingerprint)
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose schedule fingerprint differs from the registered one, then call ``super()``.

        Runs for ``Model.load_from_checkpoint(path)`` and ``trainer.fit(model, ckpt_path=path)``. Set
        ``check_schedule_on_load = False`` (class or instance attribute) to load anyway. A checkpoint without a
        fingerprint (saved without the mixin) loads with a warning. If no schedule is registered yet (a model that
        registers it later, e.g. in ``setup``), the comparison happens at the next :meth:`register_schedule`.

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
            elif self._schedule_fingerprint is None:
                self._pending_schedule_fingerprint = dict(saved)
            else:
                self._raise_on_mismatch(saved, self._schedule_fingerprint)
        super().on_load_checkpoint(checkpoint)

    def _raise_on_mismatch(self, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        diff = _fingerprint_difference(saved, current)
        if diff:
            lines = "; ".join(f"{key}: checkpoint {a!r}, model {b!r}" for key, (a, b) in diff.items())
            raise ValueError(
                f"The checkpoint was trained with a different noise schedule than {type(self).__name__} registered "
                f"({lines}). Register the checkpoint's schedule, or set `check_schedule_on_load = False` on the "
                "model to load it anyway."
            )


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Disable autocast for ``device_type`` (if autocast exists there) so the loss reduction stays float32."""
    try:
        context: contextlib.AbstractContextManager[Any] = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # pragma: no cover - a device type without autocast support
        context = contextlib.nullcontext()
    with context:
        yield
