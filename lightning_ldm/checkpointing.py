"""Gradient checkpointing. (Stub: being written.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool
) -> Any:
    raise NotImplementedError


class CheckpointFunction(torch.autograd.Function):
    """Stub."""
