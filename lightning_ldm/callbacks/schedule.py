r"""``ScheduleCallback``: the Trainer-side companion of :class:`~lightning_ldm.mixin.DiffusionMixin`.

What it does during ``trainer.fit``:

* **checks** the module: a ``DiffusionMixin`` with a registered schedule whose tables are float32/float64 after the
  strategy applied the precision flag (and, under FSDP, that its mixed precision does not cast buffers);
* **installs** a :class:`~lightning_ldm.timestep_samplers.TimestepSampler` (``module.timestep_sampler``) and a
  ``torch.Generator`` on the module's device (``module.diffusion_generator``), from which the mixin draws ``t`` and
  the noise;
* **reseeds** that generator before every training batch from ``(seed, global rank, batch counter)``: DDP ranks draw
  different ``t`` and noise, every draw is reproducible, and a run resumed from a checkpoint draws exactly what the
  uninterrupted run would have (the counter is part of the callback state; no generator state needs saving);
  validation batches are reseeded from ``(seed, rank, dataloader, batch index)``, so every validation pass sees the
  same ``t`` and noise and validation losses are comparable across epochs;
* **feeds** the per-sample training losses (``module.last_timestep_losses``) to a loss-aware sampler, gathered
  from every rank in rank order so that all ranks' samplers stay identical;
* **logs** the log-SNR curve once and the training loss by timestep bucket
  (:class:`~lightning_ldm.metrics.TimestepBucketLoss`, summed over ranks).

The state (batch counter, seed, sampler state, the current bucket window) travels with ``state_dict`` /
``load_state_dict`` in the Trainer's checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_ldm._checks import check_choice, check_int, check_real
from lightning_ldm.metrics import TimestepBucketLoss
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.schedules import LOG_FLOOR
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, TimestepSampler, UniformSampler

__all__ = ["DEFAULT_SEED", "SAMPLERS", "SamplerName", "ScheduleCallback", "derive_seed"]

log = logging.getLogger(__name__)

SamplerName = Literal["uniform", "loss_aware", "logit_normal"]
SAMPLERS: tuple[str, ...] = ("uniform", "loss_aware", "logit_normal")

#: Seed used when neither ``seed=`` nor ``PL_GLOBAL_SEED`` (set by ``seed_everything``) is given.
DEFAULT_SEED = 0

_TABLE_DTYPES = (torch.float32, torch.float64)
_TRAIN_STREAM = 0
_VAL_STREAM = 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, through numpy's ``SeedSequence`` (well-mixed, platform-stable).

    ``ScheduleCallback`` seeds training batch ``i`` of rank ``r`` with ``derive_seed(seed, 0, r, i)`` and validation
    batch ``j`` of dataloader ``d`` with ``derive_seed(seed, 1, r, d, j)``.

    Args:
        keys: Non-negative integers.

    Returns:
        An int in ``[0, 2**63)``, valid for ``torch.Generator.manual_seed``.
    """
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _resolve_seed(seed: int | None) -> int:
    if seed is not None:
        return seed
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            rank_zero_warn(f"PL_GLOBAL_SEED={env!r} is not an integer; ScheduleCallback uses seed {DEFAULT_SEED}")
            return DEFAULT_SEED
        return value if value >= 0 else value % 2**32
    return DEFAULT_SEED


class ScheduleCallback(Callback):
    r"""Check, seed, sample and log the noise schedule of a :class:`~lightning_ldm.mixin.DiffusionMixin` module.

    Example::

        trainer = L.Trainer(callbacks=[ScheduleCallback(seed=0, sampler="logit_normal")], precision="bf16-mixed")
        trainer.fit(model)   # model: class M(DiffusionMixin, L.LightningModule) with register_schedule(...)

    Seeds: training batch ``i`` (counted over the whole run, gradient-accumulation micro-batches included) on
    global rank ``r`` draws from a generator seeded with ``derive_seed(seed, 0, r, i)``. With ``seed=None`` the seed
    is taken from ``PL_GLOBAL_SEED`` (what ``seed_everything`` / LightningCLI's ``seed_everything`` set), else
    :data:`DEFAULT_SEED` (0); a resumed run with ``seed=None`` continues with the seed stored in the checkpoint.

    Loss by timestep bucket: bucket ``b`` covers ``t ∈ [⌈b·T/n⌉, ⌈(b + 1)·T/n⌉ − 1]`` and is logged as
    ``"loss_bucket/{lo}-{hi}"`` (e.g. ``"loss_bucket/000-099"`` for T = 1000, n = 10): the mean per-sample loss of
    the bucket over all ranks, either once per epoch (``log_every_n_steps=None``, through ``pl_module.log_dict``, so
    it is in ``trainer.callback_metrics`` too) or over each window of ``log_every_n_steps`` optimizer steps (written
    to ``trainer.loggers`` at that step). Empty buckets are not logged.

    The log-SNR curve ``log(ā_t/(1 − ā_t))`` is written once at fit start, on global rank zero, to every logger as
    the metric ``"schedule/log_snr"`` with ``step = t`` (``t = 0 … T − 1``): TensorBoard shows it as a chart of its
    own. A ``CSVLogger`` keeps one table for every metric, where those rows would sit among the training steps, so
    it gets the curve as a file of its own instead, ``log_snr.csv`` (columns ``t,log_snr``) in its ``log_dir``. The
    curve is also kept in :attr:`log_snr`.

    Losses: after each training batch the callback reads ``module.last_timestep_losses`` (what the last
    ``diffusion_loss`` call kept) and sets it back to ``None``, so a batch that does not call ``diffusion_loss`` adds
    nothing. With ``sampler="loss_aware"``, the per-sample losses of all ranks are gathered (three small all-gathers
    per step) so that every rank's sampler holds the same history and draws from the same distribution.

    With ``EMAWeightAveraging(use_buffers=True)``: EMA averages every buffer, the schedule tables included; the
    mixin itself puts the exact tables back (:meth:`~lightning_ldm.mixin.DiffusionMixin.restore_schedule_tables`).

    Args:
        seed: Base seed (a non-negative integer) or ``None`` (see above).
        sampler: ``"uniform"``, ``"loss_aware"`` (:class:`~lightning_ldm.timestep_samplers.LossAwareSampler`),
            ``"logit_normal"`` (:class:`~lightning_ldm.timestep_samplers.LogitNormalSampler`) or a
            :class:`~lightning_ldm.timestep_samplers.TimestepSampler` instance.
        num_buckets: Number of timestep buckets of the loss metric, in ``[1, T]`` (checked against T at fit start).
        log_snr_curve: Write the log-SNR curve to the loggers at fit start.
        logit_normal_mean: ``mean`` of the logit-normal sampler.
        logit_normal_std: ``std`` of the logit-normal sampler (> 0).
        loss_aware_history: ``history_per_term`` of the loss-aware sampler (>= 1).
        loss_aware_uniform_prob: ``uniform_prob`` of the loss-aware sampler, in [0, 1].
        log_every_n_steps: ``None`` to log the bucket losses once per training epoch, or a positive number of
            optimizer steps per logged window.

    Raises:
        TypeError: An argument has the wrong type (e.g. ``sampler`` is neither a name nor a ``TimestepSampler``).
        ValueError: An argument is out of range or ``sampler`` is an unknown name.
    """

    def __init__(
        self,
        seed: int | None = None,
        sampler: SamplerName | TimestepSampler = "uniform",
        num_buckets: int = 10,
        log_snr_curve: bool = True,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        loss_aware_history: int = 10,
        loss_aware_uniform_prob: float = 0.001,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.seed = None if seed is None else check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=1)
        if not isinstance(log_snr_curve, bool):
            raise TypeError(f"log_snr_curve must be a bool, got {log_snr_curve!r}")
        self.log_snr_curve = log_snr_curve
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        )
        mean = check_real("logit_normal_mean", logit_normal_mean)
        std = check_real("logit_normal_std", logit_normal_std, minimum=0.0, min_inclusive=False)
        history = check_int("loss_aware_history", loss_aware_history, minimum=1)
        uniform_prob = check_real("loss_aware_uniform_prob", loss_aware_uniform_prob, minimum=0.0, maximum=1.0)
        if isinstance(sampler, TimestepSampler):
            self.sampler: TimestepSampler = sampler
        elif isinstance(sampler, str):
            check_choice("sampler", sampler, SAMPLERS)
            if sampler == "uniform":
                self.sampler = UniformSampler()
            elif sampler == "loss_aware":
                self.sampler = LossAwareSampler(history_per_term=history, uniform_prob=uniform_prob)
            else:
                self.sampler = LogitNormalSampler(mean=mean, std=std)
        else:
            raise TypeError(
                f"sampler must be one of {', '.join(map(repr, SAMPLERS))} or a TimestepSampler instance, "
                f"got {sampler!r} of type {type(sampler).__name__}"
            )

        self.batch_counter = 0
        self.resolved_seed: int | None = self.seed
        self.bucket_loss: TimestepBucketLoss | None = None
        #: Log-SNR per timestep (float64, CPU), set at fit start.
        self.log_snr: Tensor | None = None
        self._last_log_step = -1
        self._pending_bucket_state: dict[str, Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._saved_module_attrs: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _require_module(pl_module: pl.LightningModule) -> DiffusionMixin:
        if not isinstance(pl_module, DiffusionMixin):
            raise TypeError(
                f"ScheduleCallback needs a LightningModule that mixes in DiffusionMixin "
                f"(class M(DiffusionMixin, L.LightningModule)), got {type(pl_module).__name__}"
            )
        return pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module type and the strategy.

        Raises:
            TypeError: The module is not a ``DiffusionMixin``.
            ValueError: FSDP is configured to cast buffers to a half dtype (the schedule tables would be rounded).
        """
        self._require_module(pl_module)
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            config = strategy.mixed_precision_config
            buffer_dtype = getattr(config, "buffer_dtype", None)
            if buffer_dtype is not None and buffer_dtype not in _TABLE_DTYPES:
                raise ValueError(
                    f"FSDP mixed precision casts buffers to {buffer_dtype}, which rounds the schedule tables (a bf16 "
                    "sqrt(1 - alphas_cumprod) is 0 at t = 0 and 1); set MixedPrecision(buffer_dtype=torch.float32)"
                )

    def _check_schedule(self, trainer: pl.Trainer, module: DiffusionMixin) -> int:
        if module.noise_schedule is None:
            raise RuntimeError(
                f"{type(module).__name__} has no noise schedule; call self.register_schedule(...) in __init__ "
                "(or in setup/configure_model) before fitting with ScheduleCallback"
            )
        num_timesteps = module.num_timesteps
        if self.num_buckets > num_timesteps:
            raise ValueError(
                f"num_buckets={self.num_buckets} is larger than the schedule's {num_timesteps} timesteps; "
                f"expected an integer in [1, {num_timesteps}]"
            )
        return num_timesteps

    # ------------------------------------------------------------------------------------------- fit start/end
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the schedule, install the sampler and the generator, log the log-SNR curve.

        Raises:
            TypeError: The module is not a ``DiffusionMixin``.
            RuntimeError: No schedule is registered.
            ValueError: A schedule table is not float32/float64, or ``num_buckets`` exceeds T.
        """
        module = self._require_module(pl_module)
        num_timesteps = self._check_schedule(trainer, module)
        if self.resolved_seed is None:
            self.resolved_seed = _resolve_seed(self.seed)
        self.sampler.prepare(num_timesteps)

        if self.bucket_loss is None or self.bucket_loss.num_timesteps != num_timesteps:
            self.bucket_loss = TimestepBucketLoss(num_timesteps, self.num_buckets)
        self.bucket_loss.to(pl_module.device)

        if module.timestep_sampler is not None and module.timestep_sampler is not self.sampler:
            rank_zero_warn(
                f"ScheduleCallback replaces the timestep_sampler {module.timestep_sampler!r} already set on "
                f"{type(module).__name__} with {self.sampler!r} for this fit"
            )
        self._saved_module_attrs = (module.timestep_sampler, module.diffusion_generator)
        self._generator = torch.Generator(device=pl_module.device)
        self._reseed(trainer, _TRAIN_STREAM, self.batch_counter)
        module.timestep_sampler = self.sampler
        module.diffusion_generator = self._generator

        alphas_cumprod = module.alphas_cumprod
        # from the float32 SNR table (computed in float64) rather than from the float32 ā: near ā = 1 the float32
        # rounding of ā is a 6e-4 relative error in 1 − ā; log(max(snr, 1e-20)) equals schedules.log_snr there.
        steps = torch.arange(num_timesteps, device=alphas_cumprod.device)
        self.log_snr = module.snr(steps).detach().to("cpu", torch.float64).clamp(min=LOG_FLOOR).log()
        if self.log_snr_curve and trainer.is_global_zero:
            self._write_snr_curve(trainer, self.log_snr.tolist())

    @staticmethod
    def _write_snr_curve(trainer: pl.Trainer, values: list[float]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                os.makedirs(logger.log_dir, exist_ok=True)
                with open(os.path.join(logger.log_dir, "log_snr.csv"), "w") as f:
                    f.write("t,log_snr\n")
                    f.writelines(f"{t},{value!r}\n" for t, value in enumerate(values))
                continue
            for t, value in enumerate(values):
                logger.log_metrics({"schedule/log_snr": value}, step=t)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the bucket window of a resumed run (on global rank 0 only: the saved sums are rank 0's)."""
        pending, self._pending_bucket_state = self._pending_bucket_state, None
        if (
            pending is not None
            and self.bucket_loss is not None
            and trainer.global_rank == 0
            and pending["loss_sum"].shape == self.bucket_loss.loss_sum.shape
        ):
            device = self.bucket_loss.loss_sum.device
            empty = torch.zeros(0, device=device)
            self.bucket_loss.update(empty.long(), empty)  # marks the metric as updated, adds nothing
            self.bucket_loss.loss_sum.copy_(pending["loss_sum"])
            self.bucket_loss.count.copy_(pending["count"])

    def _restore_module(self, pl_module: pl.LightningModule) -> None:
        if self._saved_module_attrs is not None and isinstance(pl_module, DiffusionMixin):
            pl_module.timestep_sampler, pl_module.diffusion_generator = self._saved_module_attrs
        self._saved_module_attrs = None
        self._generator = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put back the module's previous ``timestep_sampler`` and ``diffusion_generator``."""
        self._restore_module(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put back the module's previous ``timestep_sampler`` and ``diffusion_generator``."""
        self._restore_module(pl_module)

    # ----------------------------------------------------------------------------------------------- seeding
    def _reseed(self, trainer: pl.Trainer, *keys: int) -> None:
        if self._generator is None or self.resolved_seed is None:
            return
        stream, *rest = keys
        self._generator.manual_seed(derive_seed(self.resolved_seed, stream, trainer.global_rank, *rest))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Reseed the generator from ``(seed, rank, batch counter)`` and advance the counter."""
        self._reseed(trainer, _TRAIN_STREAM, self.batch_counter)
        self.batch_counter += 1

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Reseed the generator from ``(seed, rank, dataloader_idx, batch_idx)``: the same draws every validation."""
        self._reseed(trainer, _VAL_STREAM, dataloader_idx, batch_idx)

    # ------------------------------------------------------------------------------------- losses and logging
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the bucket metric and the loss-aware sampler; log the bucket window every n steps if asked."""
        module = self._require_module(pl_module)
        recorded = module.last_timestep_losses
        module.last_timestep_losses = None  # consumed: a batch without a diffusion_loss call must not re-feed it
        if recorded is not None and self.bucket_loss is not None:
            self.bucket_loss.update(*recorded)
        if self.sampler.needs_losses:
            if recorded is None:
                empty = torch.zeros(0, device=pl_module.device)
                recorded = (empty.long(), empty)
            t, losses = _gather_ranked(trainer, *recorded)
            if t.numel():
                self.sampler.update(t, losses)
        step = trainer.global_step
        if self.log_every_n_steps is not None and step != self._last_log_step and step % self.log_every_n_steps == 0:
            self._last_log_step = step
            values = self._compute_buckets()
            if values and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's loss by bucket (``log_every_n_steps=None``) through ``pl_module.log_dict``."""
        if self.log_every_n_steps is None:
            values = self._compute_buckets()
            if values:
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    def _compute_buckets(self) -> dict[str, float]:
        """Mean loss per non-empty bucket, summed over ranks; resets the metric."""
        metric = self.bucket_loss
        if metric is None or not metric.update_called:
            return {}
        means = metric.compute().tolist()
        names = metric.names()
        metric.reset()
        return {name: value for name, value in zip(names, means, strict=True) if value == value}

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Batch counter, seed, sampler state and the current bucket window (this rank's sums).

        Returns:
            ``{"batch_counter", "seed", "sampler_type", "sampler", "last_log_step", "bucket_loss"}``.
        """
        bucket: dict[str, Tensor] | None = None
        if self.bucket_loss is not None:
            bucket = {
                "loss_sum": self.bucket_loss.loss_sum.cpu().clone(),
                "count": self.bucket_loss.count.cpu().clone(),
            }
        return {
            "batch_counter": self.batch_counter,
            "seed": self.resolved_seed,
            "sampler_type": type(self.sampler).__name__,
            "sampler": self.sampler.state_dict(),
            "last_log_step": self._last_log_step,
            "bucket_loss": bucket,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        The batch counter and the sampler state are restored; with ``seed=None`` the saved seed is adopted (an
        explicit ``seed`` that differs wins, with a warning). The bucket window is restored at train start on global
        rank 0 (the checkpoint holds rank 0's sums; other ranks start their window empty). A sampler of another type
        than the saved one starts fresh, with a warning.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            KeyError: ``batch_counter`` is missing.
        """
        if "batch_counter" not in state_dict:
            raise KeyError(f"ScheduleCallback state has no 'batch_counter'; got keys {sorted(state_dict)}")
        self.batch_counter = int(state_dict["batch_counter"])
        self._last_log_step = int(state_dict.get("last_log_step", -1))
        saved_seed = state_dict.get("seed")
        if saved_seed is not None:
            if self.seed is None:
                self.resolved_seed = int(saved_seed)
            elif int(saved_seed) != self.seed:
                rank_zero_warn(
                    f"ScheduleCallback(seed={self.seed}) resumes a run that used seed {saved_seed}; the draws from "
                    "here on follow the new seed"
                )
        saved_type = state_dict.get("sampler_type")
        if saved_type == type(self.sampler).__name__:
            self.sampler.load_state_dict(state_dict.get("sampler", {}))
        elif saved_type is not None:
            rank_zero_warn(
                f"The checkpoint's timestep sampler was {saved_type}, this run uses {type(self.sampler).__name__}; "
                "its state starts fresh"
            )
        bucket = state_dict.get("bucket_loss")
        self._pending_bucket_state = dict(bucket) if bucket is not None else None


def _gather_ranked(trainer: pl.Trainer, t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(t, losses)`` concatenated in rank order (every rank gets the same result; sizes may differ)."""
    if trainer.world_size <= 1:
        return t, losses
    strategy = trainer.strategy
    t = t.reshape(-1).long()
    losses = losses.reshape(-1).float()
    sizes = strategy.all_gather(torch.tensor([t.numel()], device=t.device)).reshape(-1)
    width = int(sizes.max())
    if width == 0:  # no rank has losses this step (all ranks agree: sizes are gathered)
        return t, losses
    pad = width - t.numel()
    t_all = strategy.all_gather(torch.nn.functional.pad(t, (0, pad))).reshape(-1, width)
    l_all = strategy.all_gather(torch.nn.functional.pad(losses, (0, pad))).reshape(-1, width)
    keep = torch.arange(width, device=sizes.device)[None, :] < sizes[:, None]
    return t_all[keep], l_all[keep]
