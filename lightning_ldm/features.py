r"""Image feature extractors for sample-quality metrics (FID, KID): ``nn.Module``\ s mapping images to vectors.

Two are provided; any ``nn.Module`` mapping a batch of images ``(B, C, H, W)`` to vectors ``(B, D)`` works too (for
instance the penultimate layer of a classifier of the user's data, the most telling choice when one exists). Train
such a classifier without the real images of the real-vs-real floor: its features of the images it was fitted on
are sharper than those of unseen images (the reference, the samples), and a floor of fitted images reads too high.

- :class:`RandomConvFeatures`: a small convolutional network with fixed random weights. It needs nothing from the
  internet, works at any image size from 1×1 up, and is the default of
  :class:`~lightning_ldm.callbacks.SampleQualityMonitor`. Caveat: random features measure low-level image
  statistics (local contrast and edges, where the strokes are on a coarse grid), not what the images show; a FID on
  them is comparable only with another FID on the same features (same ``in_channels``, ``width``, ``depth``,
  ``grid`` and ``seed``) and never with a published (Inception) FID. Read it against a real-vs-real floor.
- :class:`InceptionFeatures`: torchmetrics' FID Inception-v3 (2048 pool features), the network of published FIDs.
  It needs ``torch-fidelity`` and the network's weights (downloaded on first use, or a local file), so it is opt-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ldm._checks import check_floating, check_int, check_value_range
from lightning_ldm.media import to_uint8

__all__ = ["InceptionFeatures", "RandomConvFeatures"]


class RandomConvFeatures(nn.Module):
    r"""A frozen convolutional network with seeded random weights: images ``(B, C, H, W)`` → ``(B, D)``.

    ``depth`` blocks of ``conv3×3 (padding 1) → ReLU``, each with ``width`` channels, then an average pool to a
    ``grid × grid`` layout, flattened: ``D = width·grid²`` (:attr:`num_features`). Weights are drawn once from
    ``N(0, 2/fan_in)`` (He initialisation) with a CPU generator seeded by ``seed`` (the global RNG is not touched),
    there are no biases, and nothing is trainable: the same arguments give the same features on every machine.

    See the module docstring for what such features can and cannot say.

    Args:
        in_channels: Channels of the images.
        width: Channels of every block.
        depth: Number of blocks.
        grid: Side of the pooled layout (keeps where in the image the features are).
        seed: Seed of the weights.

    Raises:
        TypeError: An argument is not an integer.
        ValueError: An argument is below 1 (``seed`` below 0).
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 2, grid: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.width = check_int("width", width, minimum=1)
        self.depth = check_int("depth", depth, minimum=1)
        self.grid = check_int("grid", grid, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        #: Length ``D`` of the feature vectors (the attribute torchmetrics' FID reads from a custom extractor).
        self.num_features = self.width * self.grid**2
        generator = torch.Generator().manual_seed(self.seed)
        layers: list[nn.Module] = []
        channels = self.in_channels
        for _ in range(self.depth):
            conv = nn.utils.skip_init(nn.Conv2d, channels, self.width, kernel_size=3, padding=1, bias=False)
            with torch.no_grad():
                fan_in = channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            layers += [conv, nn.ReLU()]
            channels = self.width
        self.net = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RandomConvFeatures:
        """Stay in eval mode (the network is fixed)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Features ``(B, width·grid²)`` of ``images`` ``(B, in_channels, H, W)`` (computed in float32)."""
        check_floating("images", images, min_ndim=4)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}")
        weight = next(self.net.parameters())
        h = self.net(images.to(device=weight.device, dtype=weight.dtype))
        return F.adaptive_avg_pool2d(h, self.grid).flatten(1)


def load_inception(weights_path: str | Path | None = None) -> nn.Module:
    """Build torchmetrics' FID Inception-v3, returning its 2048 pool features from uint8 RGB images ``(B, 3, H, W)``.

    Args:
        weights_path: A local copy of the FID Inception weights (``None``: torch-fidelity downloads them once).

    Returns:
        The network (torchmetrics' ``NoTrainInceptionV3``), in eval mode.

    Raises:
        ModuleNotFoundError: torch-fidelity is not installed.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    options: dict[str, Any] = {} if weights_path is None else {"feature_extractor_weights_path": str(weights_path)}
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], **options)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "InceptionFeatures needs torch-fidelity (pip install torch-fidelity) and the FID Inception weights "
            "(downloaded on first use, or weights_path=<a local copy>); offline, use RandomConvFeatures or a "
            "classifier of your data"
        ) from err


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 pool features (``D = 2048``) of float images in ``value_range``.

    Images are mapped to uint8 (as :func:`~lightning_ldm.media.to_uint8` does) and grey images repeated to three
    channels, which is what the network expects; it resizes them to 299×299 itself.

    Args:
        value_range: ``(low, high)`` of the images (shown as black and white).
        weights_path: A local copy of the FID Inception weights (``None``: torch-fidelity downloads them once).

    Raises:
        ModuleNotFoundError: torch-fidelity is not installed (see :func:`load_inception`).
        TypeError, ValueError: ``value_range`` is not a pair ``low < high``.
    """

    num_features = 2048

    def __init__(self, value_range: Sequence[float] = (-1.0, 1.0), weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.value_range = check_value_range(value_range)
        self.network = load_inception(weights_path)

    def forward(self, images: Tensor) -> Tensor:
        """Features ``(B, 2048)`` of ``images`` ``(B, 1 or 3, H, W)`` in ``value_range``."""
        check_floating("images", images, min_ndim=4)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        pictures = to_uint8(images, self.value_range).to(images.device)
        if pictures.shape[1] == 1:
            pictures = pictures.expand(-1, 3, -1, -1)
        return self.network(pictures).reshape(images.shape[0], -1)
