r"""``TimestepLossMonitor``: the training loss by timestep bucket, and the schedule's log-SNR curve as an artifact."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ldm._checks import check_bool, check_int
from lightning_ldm.callbacks._base import DiffusionCallback
from lightning_ldm.callbacks._diffusion import diffusion_module, schedule_timesteps
from lightning_ldm.callbacks._schedule_curve import write_curve
from lightning_ldm.metrics import TimestepBucketLoss
from lightning_ldm.schedules import log_snr

__all__ = ["TimestepLossMonitor"]


class TimestepLossMonitor(DiffusionCallback):
    r"""Log the training loss by timestep bucket of a :class:`~lightning_ldm.mixin.DiffusionMixin` module.

    Example::

        trainer = L.Trainer(callbacks=[DiffusionSeedCallback(seed=0), TimestepLossMonitor(num_buckets=10)],
                            logger=TensorBoardLogger("runs"))

    Loss by timestep bucket: after each training batch the monitor adds ``module.last_timestep_losses`` (the
    ``(t, per-sample loss)`` of the batch's ``diffusion_loss`` call; cleared before each batch) to a
    :class:`~lightning_ldm.metrics.TimestepBucketLoss`. Bucket ``b`` covers ``t ∈ [⌈b·T/n⌉, ⌈(b + 1)·T/n⌉ − 1]`` and
    is logged as ``"loss_bucket/{lo}-{hi}"`` (e.g. ``"loss_bucket/000-099"`` for T = 1000, n = 10): the mean
    per-sample loss of the bucket over all ranks, either once per epoch (``log_every_n_steps=None``, through
    ``pl_module.log_dict``, so it is in ``trainer.callback_metrics`` too) or over each window of
    ``log_every_n_steps`` optimizer steps (written to ``trainer.loggers`` at that step, on global rank zero). A bucket
    with no sample in the window is not logged; a bucket that saw a NaN loss is logged as NaN (with a warning), so a
    diverging run shows in the curves instead of going silent.

    Schedule curve (``log_schedule=True``): at fit start, on global rank zero, the log-SNR
    ``log(ā_t/(1 − ā_t))`` for ``t = 0 … T − 1`` is written once per logger by :meth:`write_schedule_curve`: a
    ``TensorBoardLogger`` gets a figure (``add_figure("schedule/log_snr", ...)``), any other logger with a local
    directory (``log_dir``/``save_dir``) a ``log_snr.png``; both get ``log_snr.csv`` (columns ``t,log_snr``) in
    that directory. Never metric rows. The figure needs matplotlib (without it only the CSV is written, with a
    warning). Override :meth:`write_schedule_curve` for other destinations. The curve is also kept in
    :attr:`log_snr`.

    State (``state_dict``): the current bucket window (this rank's sums) and the last logged step, so a resumed run
    logs the windows the uninterrupted one would.

    Args:
        num_buckets: Number of timestep buckets, in ``[1, T]`` (checked against T at fit start).
        log_every_n_steps: ``None`` to log once per training epoch, or a positive number of optimizer steps per
            logged window.
        log_schedule: Write the log-SNR curve at fit start.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: ``num_buckets`` or ``log_every_n_steps`` is below 1.
    """

    def __init__(self, num_buckets: int = 10, log_every_n_steps: int | None = None, log_schedule: bool = True) -> None:
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=1)
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        )
        self.log_schedule = check_bool("log_schedule", log_schedule)
        self.bucket_loss: TimestepBucketLoss | None = None
        #: Log-SNR per timestep (float64, CPU), set at fit start.
        self.log_snr: Tensor | None = None
        self._last_log_step = -1
        self._pending_bucket_state: dict[str, Tensor] | None = None
        self._warned_nan = False
        self._loaded = False  # load_state_dict ran since the last train start

    # ------------------------------------------------------------------------------------------------- fit start
    @override
    def reset(self) -> None:
        """At the start of a fit, forget the previous fit's window (a reused monitor logs every step again).

        What :meth:`load_state_dict` restores is kept: Lightning restores a resumed fit's callback state after
        ``setup``, and state loaded by hand before ``fit`` is kept until train start.
        """
        if self._loaded:
            return
        self._last_log_step = -1
        self._pending_bucket_state = None
        self._warned_nan = False
        if self.bucket_loss is not None:
            self.bucket_loss.reset()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check ``num_buckets`` against the schedule, set up the metric, write the schedule curve.

        Raises:
            TypeError: The module is not a ``DiffusionMixin``.
            RuntimeError: No schedule is registered.
            ValueError: ``num_buckets`` exceeds the number of timesteps.
        """
        module = diffusion_module(pl_module, type(self).__name__)
        num_timesteps = schedule_timesteps(module, type(self).__name__)
        if self.num_buckets > num_timesteps:
            raise ValueError(
                f"num_buckets={self.num_buckets} is larger than the schedule's {num_timesteps} timesteps; "
                f"expected an integer in [1, {num_timesteps}]"
            )
        if self.bucket_loss is None or self.bucket_loss.num_timesteps != num_timesteps:
            self.bucket_loss = TimestepBucketLoss(num_timesteps, self.num_buckets)
        self.bucket_loss.to(pl_module.device)
        self._warned_nan = False
        alphas_cumprod = module._require_schedule().tables_float64["alphas_cumprod"]
        self.log_snr = torch.from_numpy(log_snr(alphas_cumprod))  # float64, from the float64 table
        if self.log_schedule and trainer.is_global_zero:
            self.write_schedule_curve(trainer, self.log_snr)

    def write_schedule_curve(self, trainer: pl.Trainer, log_snr: Tensor) -> None:
        """Write the log-SNR curve to each of ``trainer.loggers`` (called once, on global rank zero).

        Override to send the curve elsewhere (e.g. ``wandb.plot.line``).

        Args:
            trainer: The Trainer.
            log_snr: float64 tensor of shape ``(T,)``: ``log_snr[t]`` for ``t = 0 … T − 1``.
        """
        for logger in trainer.loggers:
            write_curve(logger, log_snr)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the bucket window of a resumed run (on global rank 0 only: the saved sums are rank 0's)."""
        pending, self._pending_bucket_state, self._loaded = self._pending_bucket_state, None, False
        metric = self.bucket_loss
        if pending is None or metric is None or trainer.global_rank != 0:
            return
        if pending["loss_sum"].shape != metric.loss_sum.shape:
            rank_zero_warn("TimestepLossMonitor: the checkpoint's bucket window has another num_buckets; not restored")
            return
        empty = torch.zeros(0, device=metric.loss_sum.device)
        metric.update(empty.long(), empty)  # marks the metric as updated, adds nothing
        metric.loss_sum.copy_(pending["loss_sum"])
        metric.count.copy_(pending["count"])

    # ----------------------------------------------------------------------------------------------- per batch
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Clear ``module.last_timestep_losses``: a batch without a ``diffusion_loss`` call adds nothing."""
        diffusion_module(pl_module, type(self).__name__).last_timestep_losses = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add the batch's per-sample losses; log the window every ``log_every_n_steps`` optimizer steps."""
        recorded = diffusion_module(pl_module, type(self).__name__).last_timestep_losses
        if recorded is not None and self.bucket_loss is not None:
            self.bucket_loss.update(*recorded)
        step = trainer.global_step
        every = self.log_every_n_steps
        if every is not None and step != self._last_log_step and step % every == 0:
            self._last_log_step = step
            values = self.bucket_means()  # on every rank: the metric syncs across ranks
            if values and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's loss by bucket (``log_every_n_steps=None``) through ``pl_module.log_dict``."""
        if self.log_every_n_steps is None:
            values = self.bucket_means()
            if values:
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    def bucket_means(self) -> dict[str, float]:
        """Mean loss of every bucket that saw a sample in the current window, over all ranks; starts a new window.

        Returns:
            ``{bucket name: mean}``; NaN where a loss in the bucket was NaN; empty buckets left out.
        """
        metric = self.bucket_loss
        if metric is None:
            return {}
        if not metric.update_called:  # still join the ranks' sync below: another rank may have samples
            empty = torch.zeros(0, device=metric.loss_sum.device)
            metric.update(empty.long(), empty)
        means = metric.compute().reshape(-1).tolist()
        with metric.sync_context():  # the counts summed over ranks, as compute() sums them
            filled = (metric.count > 0).reshape(-1).tolist()
        metric.reset()
        values = {name: mean for name, mean, seen in zip(metric.names(), means, filled, strict=True) if seen}
        nan = [name for name, mean in values.items() if math.isnan(mean)]
        if nan and not self._warned_nan:
            self._warned_nan = True
            rank_zero_warn(f"TimestepLossMonitor: the mean training loss is NaN in {', '.join(nan)}")
        return values

    # ----------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The current bucket window (this rank's sums) and the last logged step.

        Returns:
            ``{"last_log_step", "bucket_loss"}`` (``bucket_loss``: ``{"loss_sum", "count"}`` on CPU, or ``None``).
        """
        bucket: dict[str, Tensor] | None = None
        if self.bucket_loss is not None:
            bucket = {
                "loss_sum": self.bucket_loss.loss_sum.cpu().clone(),
                "count": self.bucket_loss.count.cpu().clone(),
            }
        return {"last_log_step": self._last_log_step, "bucket_loss": bucket}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; the window is put back at train start on global rank 0.

        Args:
            state_dict: A dict from :meth:`state_dict`.
        """
        self._loaded = True
        self._last_log_step = int(state_dict.get("last_log_step", -1))
        bucket = state_dict.get("bucket_loss")
        self._pending_bucket_state = dict(bucket) if bucket is not None else None
