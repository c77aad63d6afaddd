"""Image grids of digits, and a callback that samples one every N training steps.

:class:`DigitGridLogger` stands in for the library's ``SampleLogger`` callback until that exists: every
``every_n_steps`` optimizer steps it samples ``per_class`` digits of each class with DDIM and guidance from the same
starting noise, writes the grid (one row per class) as a PNG into its folder and, with a TensorBoard logger, as an
image into the event file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor
from typing_extensions import override

from examples.latent_digits.data import NUM_CLASSES

__all__ = ["DigitGridLogger", "make_grid", "save_grid"]

log = logging.getLogger(__name__)


def make_grid(images: Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile images ``(N, 1, H, W)`` in ``[−1, 1]`` into rows of ``nrow``: a uint8 array, white on black, upscaled.

    Args:
        images: The images; ``N`` a multiple of ``nrow`` is not required (the last row is padded black).
        nrow: Images per row.
        scale: Nearest-neighbour upscaling factor.
        pad: Pixels of grey border between images (before upscaling).

    Returns:
        ``(rows·(H + pad) + pad)·scale × (nrow·(W + pad) + pad)·scale`` uint8 array.
    """
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    count, _, height, width = pixels.shape
    rows = -(-count // nrow)
    grid = np.full((rows * (height + pad) + pad, nrow * (width + pad) + pad), 64, dtype=np.uint8)
    for index in range(count):
        r, c = divmod(index, nrow)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = pixels[index, 0]
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))


def save_grid(path: Path, images: Tensor, nrow: int, scale: int = 4) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` (PNG); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, scale=scale)).save(path)
    return path


class DigitGridLogger(Callback):
    """Sample a grid (a row per class) every ``every_n_steps`` optimizer steps and at the end of training.

    # LIBRARY: SampleLogger (grids every N steps into the loggers) replaces this callback.

    Args:
        out_dir: Folder of the PNG files ``grid_step{step:06d}.png``.
        every_n_steps: Interval in optimizer steps.
        per_class: Samples per class (columns).
        guidance_scale: Classifier-free guidance scale.
        num_steps: DDIM steps.
        seed: Seed of the starting noise (the same at every step, so the grids show the training progress).
    """

    def __init__(
        self,
        out_dir: Path,
        every_n_steps: int = 500,
        per_class: int = 8,
        guidance_scale: float = 3.0,
        num_steps: int = 20,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.guidance_scale = guidance_scale
        self.num_steps = num_steps
        self.seed = seed
        self.written: list[Path] = []
        self._last_step = -1

    def _log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        labels = torch.arange(NUM_CLASSES).repeat_interleave(self.per_class)
        generator = torch.Generator().manual_seed(self.seed)
        sample: Any = pl_module.sample  # LatentDenoiser.sample
        images = sample(labels, guidance_scale=self.guidance_scale, num_steps=self.num_steps, generator=generator)
        path = save_grid(self.out_dir / f"grid_step{step:06d}.png", images, nrow=self.per_class)
        self.written.append(path)
        grid = torch.from_numpy(make_grid(images, self.per_class, scale=2)).float().div(255.0)[None]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, global_step=step)
        log.debug("wrote %s", path)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self._log_grid(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log_grid(trainer, pl_module)
