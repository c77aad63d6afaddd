"""The FID/KID features: the penultimate layer of a small CNN classifier trained on real digits.

FID means something when its features know the data: published FIDs use the pool layer of Inception-v3, a
classifier of natural images. 8×8 digits have no such network, so the example trains one, a two-layer CNN, and
measures FID/KID on its penultimate layer (:attr:`DigitFeatureNet.body`, an ``nn.Module`` mapping images to 64
features, which is all :class:`~lightning_ldm.callbacks.SampleQualityMonitor` needs).

The network trains on the training digits *except* those that make the FID floor (:func:`floor_indices`): features
of digits a network was fitted on are sharper than those of digits it never saw, so a floor of fitted digits against
the held-out ones would read higher than a floor of unseen digits, and the generated samples (never seen either)
would look closer to it than they are. Held-out digits, floor digits and samples are all unseen by the features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from examples.latent_digits.data import NUM_CLASSES
from lightning_ldm.guidance import eval_mode

__all__ = [
    "DigitFeatureNet",
    "check_feature_digits",
    "floor_indices",
    "load_feature_net",
    "save_feature_net",
    "train_feature_net",
]


def floor_indices(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices into ``labels`` of ``per_class`` digits of each class, drawn with ``seed``.

    Drawn from the training labels, these real digits are the FID floor
    (:func:`examples.latent_digits.report.real_quality`): as many as the samples of the evaluation, with the same
    class balance.

    Raises:
        ValueError: A class has fewer than ``per_class`` digits.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(NUM_CLASSES):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < per_class:
            raise ValueError(f"per_class={per_class} exceeds the {len(members)} digits of class {label}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen)


def check_feature_digits(labels: Tensor, floor_per_class: int) -> None:
    """Refuse a floor that leaves a class without training digits for the feature net (the labels left to it).

    Raises:
        ValueError: A class has no digit left; the message says how many per class the floor may take.
    """
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    if int(counts.min()) == 0:
        empty = int(counts.argmin())
        raise ValueError(
            f"samples_per_class={floor_per_class} takes every training digit of class {empty} into the FID floor, "
            f"leaving the feature net none to learn it from; use at most {floor_per_class - 1} (better far fewer)"
        )


class DigitFeatureNet(L.LightningModule):
    """A CNN classifier of ``(B, 1, 8, 8)`` digits in ``[−1, 1]``; :attr:`body` gives its penultimate features.

    ``body``: ``conv3×3(1→width) → ReLU → conv3×3(width→2·width) → ReLU → avg-pool 2 → linear(→features) → ReLU``;
    ``head``: ``linear(features → 10)``. Trained with cross-entropy and AdamW (one-cycle learning rate); dropout
    before the head keeps the features from collapsing onto the ten training labels.

    Args:
        width: Channels of the first convolution.
        features: Length of the feature vectors (the penultimate layer).
        dropout: Dropout on the features during training.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self, width: int = 32, features: int = 64, dropout: float = 0.3, lr: float = 3e-3, weight_decay: float = 1e-2
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),  # 8×8 → 4×4
            nn.Flatten(),
            nn.Linear(2 * width * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, NUM_CLASSES))

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.body(images))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("features/loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        lr, decay = self.hparams["lr"], self.hparams["weight_decay"]
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=decay)
        steps = int(self.trainer.estimated_stepping_batches)  # max_steps, or what max_epochs amounts to
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` classified as ``labels``, in eval mode (no dropout; the mode is restored)."""
        with eval_mode(self):
            return float((self(images).argmax(dim=1) == labels).float().mean())


def train_feature_net(
    trainer: L.Trainer, images: Tensor, labels: Tensor, batch_size: int, seed: int, **hparams: Any
) -> DigitFeatureNet:
    """Fit a :class:`DigitFeatureNet` on ``images``/``labels`` with ``trainer``; return it frozen, in eval mode.

    Args:
        trainer: The Trainer (its ``max_steps`` is the training length).
        images: Training images ``(N, 1, 8, 8)`` in ``[−1, 1]``.
        labels: Their labels ``(N,)``.
        batch_size: Batch size (batches shuffled with a generator seeded by ``seed``).
        seed: Seed of the shuffling.
        **hparams: Arguments of :class:`DigitFeatureNet`.
    """
    model = DigitFeatureNet(**hparams)
    generator = torch.Generator().manual_seed(seed)
    data = DataLoader(
        TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=len(images) > batch_size,
        generator=generator,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=data)
    return model.eval().requires_grad_(False)


def save_feature_net(model: DigitFeatureNet, path: str | Path) -> None:
    """Save ``model``'s hyperparameters and weights (``torch.save`` of a dict); :func:`load_feature_net` reads them."""
    torch.save({"hparams": dict(model.hparams), "state_dict": model.state_dict()}, path)


def load_feature_net(path: str | Path) -> DigitFeatureNet:
    """The feature net saved by :func:`save_feature_net`, frozen, in eval mode (its ``body`` gives the features)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitFeatureNet(**saved["hparams"])
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False)
