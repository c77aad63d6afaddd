"""The base of the package's callbacks that drive a :class:`~lightning_ldm.mixin.DiffusionMixin` module.

:class:`DiffusionCallback` checks the module and resets per-fit state at the start of every ``fit`` (before Lightning
restores a resumed fit's callback state, so a resume keeps what it restores); :class:`PeriodicCallback` adds the
"every N optimizer steps and/or at validation end" schedule of the sampling callbacks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ldm._checks import check_bool, check_int
from lightning_ldm.callbacks._diffusion import diffusion_module
from lightning_ldm.callbacks._sampling import callbacks_of
from lightning_ldm.mixin import DiffusionMixin

__all__ = ["DiffusionCallback", "PeriodicCallback"]


class DiffusionCallback(Callback):
    """A callback for a ``DiffusionMixin`` module: the module check at ``setup`` and a per-fit :meth:`reset`."""

    def diffusion_module(self, pl_module: pl.LightningModule) -> DiffusionMixin:
        """``pl_module`` as a ``DiffusionMixin``.

        Raises:
            TypeError: The module does not mix in ``DiffusionMixin``; the message names this callback.
        """
        return diffusion_module(pl_module, type(self).__name__)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module; at the start of a fit, :meth:`reset`.

        Raises:
            TypeError: The module does not mix in ``DiffusionMixin``.
        """
        self.diffusion_module(pl_module)
        if stage == "fit":
            self.reset()

    def reset(self) -> None:
        """Forget the previous fit's state (a callback reused for a second ``fit`` starts afresh); override it.

        Called at ``setup("fit")``, before Lightning restores a resumed fit's callback state with
        ``load_state_dict``, so what a resume restores is kept.
        """


class PeriodicCallback(DiffusionCallback):
    """A :class:`DiffusionCallback` that runs every ``every_n_steps`` optimizer steps and/or at validation end.

    Subclasses implement :meth:`run`. A step is run at most once (the subclass remembers what it ran); the sanity
    check's validation does not count.

    Args:
        every_n_steps: Run after every this many optimizer steps (``None``: not on a step schedule).
        at_validation_end: Run at the end of every validation pass.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: ``every_n_steps < 1``, or neither schedule is on.
    """

    def __init__(self, every_n_steps: int | None, at_validation_end: bool) -> None:
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps, minimum=1)
        self.at_validation_end = check_bool("at_validation_end", at_validation_end)
        if self.every_n_steps is None and not self.at_validation_end:
            raise ValueError(
                f"every_n_steps=None and at_validation_end=False: {type(self).__name__} would never run; set one"
            )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Do the callback's work (sample, evaluate, ...) now."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(trainer, pl_module)")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module, reset at the start of a fit, and warn when an averaging callback comes after this one."""
        super().setup(trainer, pl_module, stage)
        callbacks = callbacks_of(trainer)
        if self.every_n_steps is not None and self in callbacks:
            later = callbacks[callbacks.index(self) + 1 :]
            if any(isinstance(cb, WeightAveraging) for cb in later):
                rank_zero_warn(
                    f"{type(self).__name__} is listed before a WeightAveraging callback: its step-based runs use "
                    "averaged weights without that step's update; list it after"
                )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Run when ``global_step`` is a positive multiple of ``every_n_steps``."""
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run at the end of a validation pass (after the averaging callback has put the weights back)."""
        if self.at_validation_end and not trainer.sanity_checking:
            self.run(trainer, pl_module)
