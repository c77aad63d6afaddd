r"""``DiffusionSeedCallback``: seeded draws of t, noise and condition dropout, and the timestep distribution.

During ``trainer.fit`` the callback

* **installs** a :class:`~lightning_ldm.timestep_samplers.TimestepSampler` (``module.timestep_sampler``) and a
  ``torch.Generator`` on the module's device (``module.diffusion_generator``), from which the mixin draws ``t``, the
  noise and the condition-dropout masks, and puts the module's previous ones back when the fit ends or fails;
* **reseeds** that generator before every training batch from ``(seed, global rank, batch counter)``: DDP ranks draw
  different ``t`` and noise, every draw is reproducible, and a run resumed from a checkpoint draws exactly what the
  uninterrupted run would have (the counter is part of the callback state; no generator state needs saving);
  validation batches are reseeded from ``(seed, rank, dataloader, batch index)``, so every validation pass sees the
  same ``t`` and noise and validation losses are comparable across epochs;
* **feeds** a timestep sampler that learns from the losses (``needs_losses``, e.g.
  :class:`~lightning_ldm.timestep_samplers.LossAwareSampler`) with the per-sample training losses
  (``module.last_timestep_losses``) of all ranks, in rank order, so that every rank's sampler stays identical.

The loss by timestep bucket and the log-SNR curve are logged by
:class:`~lightning_ldm.callbacks.TimestepLossMonitor`. ``ScheduleCallback`` is this callback's former name, kept for
one release.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ldm._checks import check_choice, check_int
from lightning_ldm.callbacks._base import DiffusionCallback
from lightning_ldm.callbacks._diffusion import diffusion_module, gather_ranked, schedule_timesteps
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.seeding import derive_seed
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, TimestepSampler, UniformSampler

__all__ = ["DEFAULT_SEED", "TIMESTEP_SAMPLERS", "DiffusionSeedCallback", "ScheduleCallback", "TimestepSamplerName"]

#: Seed used when neither ``seed=`` nor ``PL_GLOBAL_SEED`` (set by ``seed_everything``) is given.
DEFAULT_SEED = 0
TimestepSamplerName = Literal["uniform", "loss_aware", "logit_normal"]
#: The timestep-sampler names the callback accepts, and the class each builds with its default arguments.
TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformSampler,
    "loss_aware": LossAwareSampler,
    "logit_normal": LogitNormalSampler,
}


def _resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else ``PL_GLOBAL_SEED`` (negative values taken modulo 2**32), else :data:`DEFAULT_SEED`."""
    if seed is not None:
        return seed
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is None:
        return DEFAULT_SEED
    try:
        value = int(env)
    except ValueError:
        rank_zero_warn(f"PL_GLOBAL_SEED={env!r} is not an integer; DiffusionSeedCallback uses seed {DEFAULT_SEED}")
        return DEFAULT_SEED
    return value if value >= 0 else value % 2**32


def _build_timestep_sampler(sampler: Any) -> TimestepSampler:
    if isinstance(sampler, TimestepSampler):
        return sampler
    if not isinstance(sampler, str):
        hint = " (the seed is the second argument: pass seed=...)" if isinstance(sampler, int) else ""
        raise TypeError(
            f"timestep_sampler must be one of {', '.join(map(repr, TIMESTEP_SAMPLERS))} or a TimestepSampler "
            f"instance, got {sampler!r} of type {type(sampler).__name__}{hint}"
        )
    check_choice("timestep_sampler", sampler, TIMESTEP_SAMPLERS)
    return TIMESTEP_SAMPLERS[sampler]()


_TRAIN_STREAM = 0
_VAL_STREAM = 1


class DiffusionSeedCallback(DiffusionCallback):
    r"""Seed the timestep/noise draws of a :class:`~lightning_ldm.mixin.DiffusionMixin` module and install its sampler.

    Example::

        trainer = L.Trainer(callbacks=[DiffusionSeedCallback(LogitNormalSampler(mean=0.5), seed=0),
                                       TimestepLossMonitor()])
        trainer.fit(model)   # model: class M(DiffusionMixin, L.LightningModule) with register_schedule(...)

    Seeds: training batch ``i`` (counted over the whole run, gradient-accumulation micro-batches included) on
    global rank ``r`` draws from a generator seeded with ``derive_seed(seed, 0, r, i)``. With ``seed=None`` the seed
    is taken from ``PL_GLOBAL_SEED`` (what ``seed_everything`` / LightningCLI's ``seed_everything`` set), else
    :data:`DEFAULT_SEED` (0); a resumed run with ``seed=None`` continues with the seed stored in the checkpoint.

    Losses: a sampler with ``needs_losses`` is updated after every training batch with ``module.last_timestep_losses``
    (what the batch's ``diffusion_loss`` call kept; cleared before each batch, so a batch without one adds nothing),
    gathered from all ranks (three small all-gathers per step) so that every rank draws from the same distribution.

    State (``state_dict``): the batch counter, the seed and the sampler's state.

    Args:
        timestep_sampler: A :class:`~lightning_ldm.timestep_samplers.TimestepSampler` instance, or a name as a
            shortcut for the default instance: ``"uniform"``, ``"loss_aware"`` (``LossAwareSampler()``),
            ``"logit_normal"`` (``LogitNormalSampler()``).
        seed: Base seed (a non-negative integer) or ``None`` (see above).

    Raises:
        TypeError: ``timestep_sampler`` is neither a name nor a ``TimestepSampler``, or ``seed`` is not an integer.
        ValueError: ``timestep_sampler`` is an unknown name, or ``seed`` is negative.
    """

    def __init__(
        self, timestep_sampler: TimestepSamplerName | TimestepSampler = "uniform", seed: int | None = None
    ) -> None:
        self.seed = None if seed is None else check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self.sampler: TimestepSampler = _build_timestep_sampler(timestep_sampler)
        self.batch_counter = 0
        self.resolved_seed: int | None = self.seed
        self._generator: torch.Generator | None = None
        self._saved_module_attrs: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------------------------------- fit start/end
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the schedule, then install the sampler and the seeded generator on the module.

        Raises:
            TypeError: The module is not a ``DiffusionMixin``.
            RuntimeError: No schedule is registered.
        """
        module = diffusion_module(pl_module, type(self).__name__)
        num_timesteps = schedule_timesteps(module, type(self).__name__)
        if self.resolved_seed is None:
            self.resolved_seed = _resolve_seed(self.seed)
        self.sampler.prepare(num_timesteps)
        if module.timestep_sampler is not None and module.timestep_sampler is not self.sampler:
            rank_zero_warn(
                f"{type(self).__name__} replaces the timestep_sampler {module.timestep_sampler!r} already set on "
                f"{type(module).__name__} with {self.sampler!r} for this fit"
            )
        self._saved_module_attrs = (module.timestep_sampler, module.diffusion_generator)
        self._generator = torch.Generator(device=pl_module.device)
        self._reseed(trainer, _TRAIN_STREAM, self.batch_counter)
        module.timestep_sampler = self.sampler
        module.diffusion_generator = self._generator

    def _uninstall(self, pl_module: pl.LightningModule) -> None:
        if self._saved_module_attrs is not None and isinstance(pl_module, DiffusionMixin):
            pl_module.timestep_sampler, pl_module.diffusion_generator = self._saved_module_attrs
        self._saved_module_attrs = None
        self._generator = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put back the module's previous ``timestep_sampler`` and ``diffusion_generator``."""
        self._uninstall(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put back the module's previous ``timestep_sampler`` and ``diffusion_generator``."""
        self._uninstall(pl_module)

    # ----------------------------------------------------------------------------------------------- seeding
    def _reseed(self, trainer: pl.Trainer, stream: int, *keys: int) -> None:
        if self._generator is None or self.resolved_seed is None:
            return
        self._generator.manual_seed(derive_seed(self.resolved_seed, stream, trainer.global_rank, *keys))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Reseed the generator from ``(seed, rank, batch counter)``, advance the counter, clear the last losses."""
        self._reseed(trainer, _TRAIN_STREAM, self.batch_counter)
        self.batch_counter += 1
        diffusion_module(pl_module, type(self).__name__).last_timestep_losses = None

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Reseed the generator from ``(seed, rank, dataloader_idx, batch_idx)``: the same draws every validation."""
        self._reseed(trainer, _VAL_STREAM, dataloader_idx, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Feed the batch's per-sample losses of all ranks to a sampler that learns from them."""
        if not self.sampler.needs_losses:
            return
        recorded = diffusion_module(pl_module, type(self).__name__).last_timestep_losses
        if recorded is None:
            empty = torch.zeros(0, device=pl_module.device)
            recorded = (empty.long(), empty)
        t, losses = gather_ranked(trainer, *recorded)  # every rank joins the gather, with or without losses
        if t.numel():
            self.sampler.update(t, losses)

    # ------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Batch counter, seed and sampler state.

        Returns:
            ``{"batch_counter", "seed", "sampler_type", "sampler"}``.
        """
        return {
            "batch_counter": self.batch_counter,
            "seed": self.resolved_seed,
            "sampler_type": type(self.sampler).__name__,
            "sampler": self.sampler.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        The batch counter and the sampler state are restored; with ``seed=None`` the saved seed is adopted (an
        explicit ``seed`` that differs wins, with a warning). A sampler of another type than the saved one starts
        fresh, with a warning.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            KeyError: ``batch_counter`` is missing.
        """
        if "batch_counter" not in state_dict:
            raise KeyError(f"{type(self).__name__} state has no 'batch_counter'; got keys {sorted(state_dict)}")
        self.batch_counter = int(state_dict["batch_counter"])
        saved_seed = state_dict.get("seed")
        if saved_seed is not None:
            if self.seed is None:
                self.resolved_seed = int(saved_seed)
            elif int(saved_seed) != self.seed:
                rank_zero_warn(
                    f"{type(self).__name__}(seed={self.seed}) resumes a run that used seed {saved_seed}; the draws "
                    "from here on follow the new seed"
                )
        saved_type = state_dict.get("sampler_type")
        if saved_type == type(self.sampler).__name__:
            self.sampler.load_state_dict(state_dict.get("sampler", {}))
        elif saved_type is not None:
            rank_zero_warn(
                f"The checkpoint's timestep sampler was {saved_type}, this run uses {type(self.sampler).__name__}; "
                "its state starts fresh"
            )


class ScheduleCallback(DiffusionSeedCallback):
    """Deprecated name of :class:`DiffusionSeedCallback` (kept for one release): ``sampler=`` is ``timestep_sampler=``.

    Args:
        sampler: See ``timestep_sampler`` of :class:`DiffusionSeedCallback`.
        seed: See :class:`DiffusionSeedCallback`.
    """

    def __init__(self, sampler: TimestepSamplerName | TimestepSampler = "uniform", seed: int | None = None) -> None:
        warnings.warn(
            "ScheduleCallback is renamed DiffusionSeedCallback (its sampler= argument is timestep_sampler=); the old "
            "name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(sampler, seed)
