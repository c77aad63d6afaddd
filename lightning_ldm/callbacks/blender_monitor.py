"""``AlphaBlenderMonitor``: log the current α of every :class:`~lightning_ldm.blending.AlphaBlender`."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ldm._checks import check_choice, check_int
from lightning_ldm.blending import AlphaBlender

__all__ = ["AlphaBlenderMonitor", "current_alpha"]

LoggingInterval = Literal["step", "epoch"]


def current_alpha(blender: nn.Module) -> Tensor:
    """The blender's α without an image indicator: ``mix_factor`` for ``"fixed"``, else ``sigmoid(mix_factor)``.

    For ``"learned_with_images"`` this is the α of video frames (still images always get α = 1).

    Args:
        blender: An :class:`~lightning_ldm.blending.AlphaBlender`.

    Returns:
        Detached float32 scalar tensor on the blender's device.
    """
    mix_factor: Tensor = getattr(blender, "mix_factor")  # noqa: B009 (a buffer or a parameter, typed as Tensor here)
    mix = mix_factor.detach().float().reshape(-1)[0]
    return mix if getattr(blender, "merge_strategy", None) == "fixed" else torch.sigmoid(mix)


class AlphaBlenderMonitor(Callback):
    r"""Log the current α of each ``AlphaBlender`` in the module as ``"alpha/<qualified module name>"``.

    α weights the spatial branch: ``out = α·x_spatial + (1 − α)·x_temporal`` (see :func:`current_alpha`). The values
    are written to every logger of the Trainer on global rank zero, at ``step = trainer.global_step``: at train start
    and then every ``log_every_n_steps`` optimizer steps (``logging_interval="step"``) or at the end of every training
    epoch (``"epoch"``). Cheap: the α of all blenders are stacked and read back with one device sync per logged step,
    on rank zero only; nothing is synchronised across ranks (DDP keeps the parameters equal).

    Args:
        logging_interval: ``"step"`` or ``"epoch"``.
        log_every_n_steps: For ``"step"``: log every this many optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``.

    Raises:
        ValueError: ``logging_interval`` is not ``"step"``/``"epoch"`` or ``log_every_n_steps < 1``.
        TypeError: ``log_every_n_steps`` is not an integer.
    """

    def __init__(self, logging_interval: LoggingInterval = "step", log_every_n_steps: int | None = None) -> None:
        check_choice("logging_interval", logging_interval, ("step", "epoch"))
        self.logging_interval = logging_interval
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        )
        self._blenders: list[tuple[str, nn.Module]] = []
        self._last_logged_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the blenders (warns when there is none)."""
        self._blenders = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, AlphaBlender)]
        self._last_logged_step = -1
        if not self._blenders:
            rank_zero_warn(f"AlphaBlenderMonitor found no AlphaBlender in {type(pl_module).__name__}; it logs nothing")

    def alphas(self) -> dict[str, float]:
        """Current α of each blender found at fit start, keyed ``"alpha/<name>"`` (one device sync)."""
        if not self._blenders:
            return {}
        values = torch.stack([current_alpha(m) for _, m in self._blenders]).cpu().tolist()
        return {f"alpha/{name}": value for (name, _), value in zip(self._blenders, values, strict=True)}

    def _log(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_logged_step or not trainer.is_global_zero or not self._blenders:
            return
        self._last_logged_step = step
        values = self.alphas()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the starting α (``"step"`` interval)."""
        if self.logging_interval == "step":
            self._log(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        """Log every ``log_every_n_steps`` optimizer steps (``"step"`` interval)."""
        if self.logging_interval != "step":
            return
        every = self.log_every_n_steps
        if every is None:
            every = int(getattr(trainer, "log_every_n_steps", 50))  # set by Trainer(log_every_n_steps=...)
        if every and trainer.global_step % every == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log at the end of each training epoch (``"epoch"`` interval)."""
        if self.logging_interval == "epoch":
            self._log(trainer)
