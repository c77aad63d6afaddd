"""instantiate_from_config and HybridConditioner. (Stub: being written.)"""

from __future__ import annotations

from typing import Any

from torch import nn


def instantiate_from_config(config: Any) -> Any:
    raise NotImplementedError


class HybridConditioner(nn.Module):
    """Stub."""
