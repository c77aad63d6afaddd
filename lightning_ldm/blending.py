"""AlphaBlender. (Stub: being written.)"""

from __future__ import annotations

from torch import nn


class AlphaBlender(nn.Module):
    """Stub."""
