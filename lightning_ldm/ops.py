"""Small tensor and module operations of CompVis' ``util.py`` (named ``ops`` so as not to shadow ``torch.nn``).

Each function keeps the reference utility's name, signature and numbers for valid input and raises a clear error for bad
input instead of failing later.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_ldm._checks import check_shape, check_timesteps

__all__ = [
    "avg_pool_nd",
    "extract_into_tensor",
    "gather_coefficients",
    "mean_flat",
    "noise_like",
    "scale_module",
    "zero_module",
]


def gather_coefficients(table: Tensor, t: Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gather ``table[t]`` in ``dtype`` and shape it ``(B, 1, ..., 1)`` to broadcast over a sample of ``ndim`` dims.

    No validation: the hot path behind :func:`extract_into_tensor` and :mod:`lightning_ldm.noising` (so it skips the
    cast and the reshape when they would do nothing, and returns a fresh tensor, not a view, for ``ndim <= 1``).
    """
    out = table.index_select(0, t)
    if out.dtype != dtype:
        out = out.to(dtype)
    return out if ndim <= 1 else out.view(t.shape[0], *((1,) * (ndim - 1)))


def extract_into_tensor(a: Tensor, t: Tensor, x_shape: Sequence[int]) -> Tensor:
    """Gather ``a[t]`` and reshape it to ``(B, 1, ..., 1)`` with ``len(x_shape) - 1`` trailing ones.

    Same numbers and dtype as CompVis' ``a.gather(-1, t).reshape(b, *((1,) * (len(x_shape) - 1)))``.

    Args:
        a: 1-D table indexed by timestep.
        t: 1-D integer tensor of timesteps, one per sample.
        x_shape: Shape of the sample the result will broadcast against.

    Returns:
        Tensor of shape ``(len(t), 1, ..., 1)`` in ``a``'s dtype.

    Raises:
        TypeError: ``t`` is not an integer tensor.
        ValueError: ``a`` is not 1-D, ``t`` is not 1-D, or an index is out of range.
    """
    if not isinstance(a, Tensor) or a.ndim != 1:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"a must be a 1-D tensor (a per-timestep table), got {shape}")
    check_timesteps(t, a.shape[0])
    if len(x_shape) < 1:
        raise ValueError(f"x_shape must have at least one dimension (the batch), got {tuple(x_shape)}")
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place (buffers untouched) and return the same module."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` in place (buffers untouched) and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: Tensor) -> Tensor:
    """Mean over every dimension but the first: one value per sample.

    A 1-D input is already one value per sample and comes back as a copy (CompVis returns a single scalar there).
    An empty batch gives an empty result.

    Raises:
        ValueError: ``tensor`` is 0-d (it has no batch dimension), or its samples have no element (their mean would
            be NaN).
    """
    if tensor.ndim == 0:
        raise ValueError("mean_flat needs a batch dimension; got a 0-d tensor")
    if tensor.shape[0] and tensor.ndim > 1 and tensor[0].numel() == 0:
        raise ValueError(
            f"mean_flat needs samples of at least one element (a mean over none is NaN), got {tuple(tensor.shape)}"
        )
    if tensor.ndim == 1:
        return tensor.clone()
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


_POOLS: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def avg_pool_nd(dims: int, *args: object, **kwargs: object) -> nn.Module:
    """Return ``nn.AvgPool1d``, ``nn.AvgPool2d`` or ``nn.AvgPool3d`` for ``dims`` 1, 2 or 3.

    Raises:
        ValueError: ``dims`` is not 1, 2 or 3.
    """
    if isinstance(dims, bool) or not isinstance(dims, numbers.Integral) or int(dims) not in _POOLS:
        raise ValueError(f"unsupported dimensions: dims={dims!r}; expected 1, 2 or 3")
    return _POOLS[int(dims)](*args, **kwargs)


def noise_like(
    shape: Sequence[int],
    device: torch.device | str,
    repeat: bool = False,
    *,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard normal noise of ``shape``; with ``repeat``, one sample tiled over the batch.

    Args:
        shape: Output shape; ``shape[0]`` is the batch.
        device: Device of the result.
        repeat: Draw one sample of shape ``(1, *shape[1:])`` and repeat it ``shape[0]`` times.
        dtype: Floating dtype of the result (torch's default dtype when ``None``).
        generator: Random generator to draw from (the global one when ``None``).

    Returns:
        Noise tensor of ``shape``.

    Raises:
        ValueError: ``shape`` has a negative size, or is empty with ``repeat`` (it needs a batch dimension).
        TypeError: ``dtype`` is not a floating dtype, or ``shape`` holds a non-integer (``2.7``, ``True``).
    """
    shape = check_shape("shape", shape, min_ndim=0, minimum=None)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape={shape} has a negative size; expected sizes >= 0")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype} is not a floating dtype; expected e.g. torch.float32 or torch.bfloat16")
    if repeat:
        if len(shape) == 0:
            raise ValueError("noise_like(repeat=True) needs a batch dimension; got shape ()")
        one = torch.randn((1, *shape[1:]), device=device, dtype=dtype, generator=generator)
        return one.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)
