"""What sampling callbacks share: sample with the averaged weights, in eval mode, leaving training's RNG untouched.

The pieces are :class:`~lightning_ldm.callbacks.SampleLogger`'s (imported from there, not copied): the averaged
module of a ``WeightAveraging`` callback, the bitwise weight swap, and the kept random streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl

from lightning_ldm.callbacks.sample_logger import _first_averaged_module, _swapped_weights, _training_streams_kept

__all__ = ["sampling_weights"]


@contextlib.contextmanager
def sampling_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Run the body with ``pl_module`` in eval mode and the averaged weights in place, as ``SampleLogger`` samples.

    On exit: the training weights are back bitwise, every submodule's train/eval mode is restored, and so are the
    global CPU RNG, the module device's CUDA RNG and ``pl_module.diffusion_generator``.

    Args:
        trainer: The Trainer (its first ``WeightAveraging`` callback with an averaged model supplies the weights).
        pl_module: The module to sample.
    """
    averaged = _first_averaged_module(trainer)
    modes = [(m, m.training) for m in pl_module.modules()]
    pl_module.eval()
    try:
        with _training_streams_kept(pl_module), contextlib.ExitStack() as stack:
            if averaged is not None:
                stack.enter_context(_swapped_weights(pl_module, averaged))
            yield
    finally:
        for module, mode in modes:
            module.training = mode
