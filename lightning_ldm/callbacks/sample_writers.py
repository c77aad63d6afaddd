"""Write a picture or a clip of samples to whatever loggers a Trainer has (used by ``SampleLogger``).

============================  ==========================================================================
logger                        what it gets
============================  ==========================================================================
``TensorBoardLogger``         images: ``experiment.add_image(tag, grid, step)``; clips: an animated GIF
                              in an image summary (what ``add_video`` writes, encoded with Pillow, so
                              moviepy is not needed)
``WandbLogger``               images: ``logger.log_image(tag, [grid])``; clips: a GIF file (see below)
                              through ``logger.log_video(tag, [path], format=["gif"])``
any other logger, or none     PNG (images) and GIF (clips) files in ``<log_dir>/samples/``
============================  ==========================================================================

Files are named ``{tag}_step{step:07d}.png`` / ``.gif`` (``/`` in the tag becomes ``_``) and live in
``<dir>/samples`` of the first logger with a local directory (``log_dir``, else ``save_dir``), else of
``trainer.default_root_dir``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from lightning_ldm.callbacks._diffusion import logger_directory
from lightning_ldm.media import encode_gif, write_gif, write_png

__all__ = ["needs_pillow", "sample_dir", "sample_path", "write_image", "write_video"]

log = logging.getLogger(__name__)


def sample_dir(trainer: pl.Trainer) -> Path:
    """``<dir>/samples``: the first logger's local directory (``log_dir``, else ``save_dir``), else the root dir."""
    for logger in trainer.loggers:
        directory = logger_directory(logger)
        if directory is not None:
            return Path(directory) / "samples"
    return Path(trainer.default_root_dir) / "samples"


def sample_path(trainer: pl.Trainer, tag: str, step: int, suffix: str) -> Path:
    """``sample_dir(trainer) / f"{tag}_step{step:07d}{suffix}"``, tag characters outside ``[A-Za-z0-9_.-]`` → ``_``."""
    name = re.sub(r"[^\w.-]", "_", tag, flags=re.ASCII)
    return sample_dir(trainer) / f"{name}_step{step:07d}{suffix}"


def _needs_files(trainer: pl.Trainer) -> bool:
    loggers = trainer.loggers
    return not loggers or any(not isinstance(lg, (TensorBoardLogger, WandbLogger)) for lg in loggers)


def needs_pillow(trainer: pl.Trainer, *, clips: bool, who: str) -> None:
    """Raise at ``setup`` when writing samples to ``trainer``'s loggers will need Pillow and it is not installed.

    Pillow encodes the PNG and GIF files (any logger but TensorBoard and W&B, or none) and the animations of clips
    (every logger).

    Raises:
        ModuleNotFoundError: Pillow is needed and missing; the message names the ``logging`` extra.
    """
    if (clips or _needs_files(trainer)) and importlib.util.find_spec("PIL") is None:
        what = "animated GIFs of clips" if clips else f"PNG files for {[type(lg).__name__ for lg in trainer.loggers]}"
        raise ModuleNotFoundError(
            f'{who} writes {what} with Pillow, which is not installed: pip install "lightning_ldm[logging]" (or '
            "pillow), or log to TensorBoard/W&B only",
            name="PIL",
        )


def write_image(trainer: pl.Trainer, tag: str, grid: Tensor, step: int) -> list[str]:
    """Send a ``(C, H, W)`` uint8 picture to every logger of ``trainer`` (see the module docstring).

    Args:
        trainer: The Trainer whose loggers receive the picture.
        tag: Name of the picture.
        grid: uint8 ``(C, H, W)`` picture, C in (1, 3).
        step: Global step.

    Returns:
        Where it went: logger class names and file paths.
    """
    written: list[str] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=step, dataformats="CHW")
        elif isinstance(logger, WandbLogger):
            array = grid.permute(1, 2, 0).numpy()
            logger.log_image(key=tag, images=[array[..., 0] if grid.shape[0] == 1 else array], step=step)
        else:
            continue
        written.append(type(logger).__name__)
    if _needs_files(trainer):
        written.append(str(write_png(sample_path(trainer, tag, step, ".png"), grid)))
    return written


def write_video(trainer: pl.Trainer, tag: str, frames: Tensor, step: int, fps: float) -> list[str]:
    """Send ``(T, C, H, W)`` uint8 frames, as an animation, to every logger of ``trainer``.

    Args:
        trainer: The Trainer whose loggers receive the clip.
        tag: Name of the clip.
        frames: uint8 ``(T, C, H, W)`` frames, C in (1, 3).
        step: Global step.
        fps: Frames per second.

    Returns:
        Where it went: logger class names and file paths.
    """
    written: list[str] = []
    gif: Path | None = None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_gif(logger.experiment, tag, frames, step, fps)
        elif isinstance(logger, WandbLogger):
            if gif is None:
                gif = write_gif(sample_path(trainer, tag, step, ".gif"), frames, fps=fps)
            logger.log_video(key=tag, videos=[str(gif)], step=step, format=["gif"])
        else:
            continue
        written.append(type(logger).__name__)
    if _needs_files(trainer):
        gif = gif or write_gif(sample_path(trainer, tag, step, ".gif"), frames, fps=fps)
        written.append(str(gif))
    return written


def _tensorboard_gif(writer: Any, tag: str, frames: Tensor, step: int, fps: float) -> None:
    """An image summary holding an animated GIF, as ``SummaryWriter.add_video`` writes one (without moviepy)."""
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.proto.summary_pb2 import Summary
    else:
        from tensorboard.compat.proto.summary_pb2 import Summary
    _, channels, height, width = frames.shape
    image = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=encode_gif(frames, fps=fps)
    )
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    writer.file_writer.add_summary(summary, global_step=step)
