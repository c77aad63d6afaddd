"""scikit-learn's bundled handwritten digits (1,797 images of 8×8 pixels, no download), split and scaled.

The pixels of ``sklearn.datasets.load_digits`` are integers in ``[0, 16]``; the images here are
``x / 8 − 1 ∈ [−1, 1]``, shape ``(1, 8, 8)``. The split into a training part and a held-out part is stratified by
class and fixed by a seed, so the autoencoder, the denoiser and the classifier see the same training images in every
run, and the held-out images are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["NUM_CLASSES", "DigitsDataModule", "DigitsSplit", "from_pixels", "load_split", "to_pixels"]

#: Number of digit classes (0-9).
NUM_CLASSES = 10
_PIXEL_MAX = 16.0


def to_pixels(images: Tensor) -> np.ndarray:
    """Images ``(N, 1, 8, 8)`` in ``[−1, 1]`` → ``load_digits`` features: ``(N, 64)`` float64 in ``[0, 16]``."""
    flat = images.detach().float().cpu().clamp(-1.0, 1.0).reshape(images.shape[0], -1)
    return ((flat + 1.0) * (_PIXEL_MAX / 2.0)).double().numpy()


def from_pixels(pixels: np.ndarray) -> Tensor:
    """``load_digits`` features ``(N, 64)`` in ``[0, 16]`` → float32 images ``(N, 1, 8, 8)`` in ``[−1, 1]``."""
    images = torch.as_tensor(np.asarray(pixels, dtype=np.float32)) / (_PIXEL_MAX / 2.0) - 1.0
    return images.reshape(-1, 1, 8, 8)


@dataclass(frozen=True)
class DigitsSplit:
    """The digits, split: images ``(N, 1, 8, 8)`` in ``[−1, 1]`` and labels ``(N,)`` (int64)."""

    train_images: Tensor
    train_labels: Tensor
    holdout_images: Tensor
    holdout_labels: Tensor


def load_split(holdout_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Load the digits and split them, stratified by class, into a training and a held-out part.

    Args:
        holdout_fraction: Fraction of each class held out, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        The split.

    Raises:
        ValueError: ``holdout_fraction`` is not in (0, 1).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = np.asarray(digits.data), np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_index, holdout_index = [], []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(holdout_fraction * members.size)
        holdout_index.append(members[:cut])
        train_index.append(members[cut:])
    train, holdout = np.sort(np.concatenate(train_index)), np.sort(np.concatenate(holdout_index))
    return DigitsSplit(
        train_images=from_pixels(pixels[train]),
        train_labels=torch.as_tensor(labels[train]),
        holdout_images=from_pixels(pixels[holdout]),
        holdout_labels=torch.as_tensor(labels[holdout]),
    )


class DigitsDataModule(L.LightningDataModule):
    """Batches ``(image, label)`` of the training split (shuffled, seeded); the held-out split in :attr:`split`.

    Args:
        batch_size: Batch size.
        holdout_fraction: Fraction of each class held out.
        seed: Seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 128, holdout_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.split = load_split(holdout_fraction, seed)
        if batch_size > len(self.split.train_labels):  # drop_last would leave no batch at all
            raise ValueError(
                f"batch_size={batch_size} exceeds the {len(self.split.train_labels)} training digits; use at most that"
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last, smaller batch is dropped."""
        data = TensorDataset(self.split.train_images, self.split.train_labels)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator)
