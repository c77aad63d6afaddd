"""The judge: a scikit-learn classifier of the 64 pixels, trained on the real training split only.

Its accuracy on the held-out real digits is the ceiling that the samples' class accuracy is read against.

The pixels are not standardised: a ``StandardScaler`` divides each pixel by its standard deviation over the training
digits, which is tiny for the near-constant pixels at the border, so a faint stroke there in a generated digit
would dominate the kernel distance, and the judge would grade how closely the samples match the border statistics
of the training set instead of which digit they show.
"""

from __future__ import annotations

import numpy as np
from sklearn.svm import SVC
from torch import Tensor

from examples.latent_digits.data import to_pixels

__all__ = ["DigitClassifier"]


class DigitClassifier:
    """An RBF support-vector classifier of the raw pixels (``load_digits`` scale, ``[0, 16]``).

    Args:
        c: SVC regularisation ``C``.
        gamma: RBF kernel width (``"scale"``: 1 / (64·variance of the pixels), scikit-learn's default).
    """

    def __init__(self, c: float = 10.0, gamma: float | str = "scale") -> None:
        self.svc = SVC(C=c, gamma=gamma)

    def fit(self, images: Tensor, labels: Tensor) -> DigitClassifier:
        """Fit on images ``(N, 1, 8, 8)`` in ``[−1, 1]`` and labels ``(N,)``; return ``self``."""
        self.svc.fit(to_pixels(images), labels.cpu().numpy())
        return self

    def predict(self, images: Tensor) -> np.ndarray:
        """Predicted labels ``(N,)`` of images ``(N, 1, 8, 8)`` in ``[−1, 1]`` (clamped there first)."""
        return np.asarray(self.svc.predict(to_pixels(images)), dtype=np.int64)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` labelled as ``labels``."""
        return float(np.mean(self.predict(images) == labels.cpu().numpy()))
