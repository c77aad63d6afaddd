"""Synthetic video data, generated on the fly: shapes that move, and still images.

Every item is a short clip ``(T, C, H, W)`` in ``[-1, 1]`` (background −1) holding one square or disc. A *video*
item moves the shape with a constant velocity that bounces off the borders; a *still* item repeats one image T times
and flags every frame in ``image_only_indicator`` (the flag Stable Video Diffusion uses to train its temporal layers
on video and images at once: :class:`lightning_ldm.AlphaBlender` then gives those frames the spatial path only).

Items are deterministic functions of ``(seed, index)``: nothing is stored or downloaded, any worker can make any
item, and the validation set is the same clips in every run.
"""

from __future__ import annotations

from typing import TypedDict

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ClipBatch", "MovingShapes", "VideoClipDataModule", "render_clip"]

_SUPERSAMPLE = 4


class ClipBatch(TypedDict):
    """One item (or, collated, one batch) of :class:`MovingShapes`."""

    video: Tensor  # (T, C, H, W) float32 in [-1, 1]; collated (B, T, C, H, W)
    image_only_indicator: Tensor  # (T,) bool, True for a still image; collated (B, T)


def _bounce(start: float, velocity: float, frames: int, room: float) -> np.ndarray:
    """Positions ``start + k·velocity`` for ``k = 0..frames-1``, reflected into ``[0, room]``."""
    raw = start + velocity * np.arange(frames)
    period = 2.0 * room
    folded = np.mod(raw, period)
    return np.where(folded > room, period - folded, folded)


def _coverage_1d(pos: np.ndarray, extent: float, size: int) -> np.ndarray:
    """Fraction of each pixel ``[x, x+1)`` covered by the interval ``[pos, pos + extent)``: shape ``(frames, size)``."""
    x = np.arange(size)[None, :]
    lo = np.maximum(x, pos[:, None])
    hi = np.minimum(x + 1, pos[:, None] + extent)
    return np.clip(hi - lo, 0.0, 1.0)


def render_clip(
    rng: np.random.Generator, frames: int, size: int, channels: int, still: bool, max_speed: float
) -> np.ndarray:
    """Draw one clip: a square or a disc of random size and colour, moving (or not), anti-aliased.

    Args:
        rng: Random generator that decides everything about the clip.
        frames: Number of frames T.
        size: Height and width H = W in pixels.
        channels: Number of channels C (1 = grey, 3 = colour).
        still: Repeat the first frame instead of moving the shape.
        max_speed: Largest speed in pixels per frame (the speed is drawn in ``[max_speed / 2, max_speed]``).

    Returns:
        ``(T, C, H, W)`` float32 array in ``[-1, 1]``.
    """
    extent = rng.uniform(0.25, 0.35) * size
    room = size - extent
    start = rng.uniform(0.0, room, size=2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    speed = 0.0 if still else rng.uniform(0.5 * max_speed, max_speed)
    ys = _bounce(start[0], speed * np.sin(angle), frames, room)
    xs = _bounce(start[1], speed * np.cos(angle), frames, room)
    if rng.random() < 0.5:  # square: exact area coverage of each pixel
        mask = _coverage_1d(ys, extent, size)[:, :, None] * _coverage_1d(xs, extent, size)[:, None, :]
    else:  # disc: coverage of each pixel estimated on a 4×4 grid of sub-pixel samples
        sub = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
        cy = ys[:, None, None] + extent / 2
        cx = xs[:, None, None] + extent / 2
        inside = (sub[None, :, None] - cy) ** 2 + (sub[None, None, :] - cx) ** 2 <= (extent / 2) ** 2
        mask = inside.reshape(frames, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))
    colour = np.ones(channels) if channels == 1 else rng.uniform(0.3, 1.0, size=channels)
    # background -1, shape brightness 2·colour - 1
    clip = -1.0 + 2.0 * mask[:, None, :, :] * colour[None, :, None, None]
    return clip.astype(np.float32)


class MovingShapes(Dataset[ClipBatch]):
    """Clips of one bouncing square or disc, mixed with still images; item ``i`` is a function of ``(seed, i)``.

    Args:
        length: Number of items.
        frames: Frames per clip T.
        size: Frame height and width.
        channels: Channels per frame.
        still_fraction: Probability that an item is a still image (all frames equal, flagged image-only).
        max_speed: Largest speed of the moving shape, pixels per frame.
        seed: Seed of the whole set (train and validation sets use different seeds).

    Raises:
        ValueError: A size or count is not positive or ``still_fraction`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        length: int,
        frames: int = 8,
        size: int = 16,
        channels: int = 1,
        still_fraction: float = 0.25,
        max_speed: float = 1.5,
        seed: int = 0,
    ) -> None:
        for name, value, low in (
            ("length", length, 1),
            ("frames", frames, 2),
            ("size", size, 4),
            ("channels", channels, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= still_fraction <= 1.0:
            raise ValueError(f"still_fraction must lie in [0, 1], got {still_fraction!r}")
        if max_speed < 0:
            raise ValueError(f"max_speed must be >= 0, got {max_speed!r}")
        self.length = int(length)
        self.frames = int(frames)
        self.size = int(size)
        self.channels = int(channels)
        self.still_fraction = float(still_fraction)
        self.max_speed = float(max_speed)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ClipBatch:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of {self.length} clips")
        rng = np.random.default_rng([self.seed, index])
        still = bool(rng.random() < self.still_fraction)
        clip = render_clip(rng, self.frames, self.size, self.channels, still, self.max_speed)
        return {
            "video": torch.from_numpy(clip),
            "image_only_indicator": torch.full((self.frames,), still, dtype=torch.bool),
        }


class VideoClipDataModule(L.LightningDataModule):
    """Training clips (video + stills) and validation clips (video only) of :class:`MovingShapes`.

    Args:
        frames: Frames per clip T.
        size: Frame height and width.
        channels: Channels per frame.
        still_fraction: Share of still images in the training set (the validation set has none).
        max_speed: Largest speed of the moving shape, pixels per frame.
        num_train: Training clips per epoch.
        num_val: Validation clips.
        batch_size: Clips per batch.
        num_workers: DataLoader worker processes (0: make the clips in the main process; they are cheap).
        seed: Seed of the training set; the validation set uses ``seed + 1``.
    """

    def __init__(
        self,
        frames: int = 8,
        size: int = 16,
        channels: int = 1,
        still_fraction: float = 0.25,
        max_speed: float = 1.5,
        num_train: int = 4096,
        num_val: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set = MovingShapes(num_train, frames, size, channels, still_fraction, max_speed, seed=seed)
        self.val_set = MovingShapes(num_val, frames, size, channels, 0.0, max_speed, seed=seed + 1)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader[ClipBatch]:
        generator = torch.Generator().manual_seed(self.hparams["seed"])
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[ClipBatch]:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
