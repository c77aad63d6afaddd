"""Sinusoidal timestep embedding. (Stub: being written.)"""

from __future__ import annotations

from torch import Tensor, nn


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> Tensor:
    raise NotImplementedError


class SinusoidalTimestepEmbedding(nn.Module):
    """Stub."""
