r"""Sinusoidal timestep embedding (Ho et al. 2020; Vaswani et al. 2017), with a cached frequency table.

For ``half = dim // 2`` frequencies

.. math::

    f_i = \exp\left(-\ln(P)\, \frac{i}{\mathrm{half}}\right), \quad i = 0, \dots, \mathrm{half} - 1, \qquad
    \mathrm{emb}(t) = [\cos(t f_0), \dots, \cos(t f_{\mathrm{half}-1}), \sin(t f_0), \dots, \sin(t f_{\mathrm{half}-1})]

with :math:`P` = ``max_period``, all in float32, cos first, and one zero column appended when ``dim`` is odd. The
numbers are bitwise those of CompVis' ``timestep_embedding`` and of diffusers'
``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

CompVis rebuilds the frequency table on every call and concatenates three temporaries; here the frequency row is
built once per ``(dim, max_period, device)`` and cos/sin are written straight into one preallocated output (same
kernels, same bits). Integer timesteps on the CPU, the common case in training, are gathered from a cached table of
whole embeddings, computed once by those same kernels: elementwise kernels give each element the same bits whatever
batch it sits in, so the rows are bitwise the directly computed ones.

Under ``torch.compile`` the caches and the range check of the table path (host reads) are left out: the embedding is
traced as the out-of-place formula with the frequency row computed in the graph, so it compiles into one graph with
``fullgraph=True``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from lightning_ldm._checks import check_int, check_real, check_tensor

__all__ = ["SinusoidalTimestepEmbedding", "timestep_embedding"]

_CACHE_SIZE = 64
_TABLES = 8  # cached integer-timestep tables, each at most _MAX_TABLE_ELEMENTS floats (64 MiB in all at worst)
_MIN_TABLE = 1024
_MAX_TABLE_ELEMENTS = 1 << 21  # 8 MiB of float32: 1024 timesteps up to dim 2048


def _frequency_row(half: int, max_period: float, device: torch.device) -> Tensor:
    """The float32 frequency row ``exp(-ln(max_period) · arange(half) / half)`` of shape ``(1, half)``."""
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=device)
    return torch.exp(exponent / half).unsqueeze(0)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _frequencies(half: int, max_period: float, device: torch.device) -> Tensor:
    """:func:`_frequency_row`, cached per ``(half, max_period, device)``.

    Built outside inference mode and without autograd so the cached tensor can be used (and saved for backward) in
    any later mode.
    """
    with torch.inference_mode(False), torch.no_grad():
        return _frequency_row(half, max_period, device)


def _validate(timesteps: Tensor, dim: int, max_period: float) -> None:
    check_tensor("timesteps", timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D with one timestep per sample, got shape {tuple(timesteps.shape)}")
    if timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must hold real numbers (integer or floating), got dtype {timesteps.dtype}")
    check_int("dim", dim, minimum=1)
    check_real("max_period", max_period, minimum=0.0, min_inclusive=False)


def _direct(timesteps: Tensor, dim: int, max_period: float) -> Tensor:
    """Embed float32 ``timesteps``: ``t · f`` written into the cos half, its sin beside it, then cos in place."""
    half = dim // 2
    out = torch.empty((timesteps.shape[0], dim), dtype=torch.float32, device=timesteps.device)
    if half:
        cos = out[:, :half]
        torch.mul(timesteps.unsqueeze(1), _frequencies(half, max_period, timesteps.device), out=cos)
        torch.sin(cos, out=out[:, half : 2 * half])
        cos.cos_()
    if dim % 2:
        out[:, -1].zero_()
    return out


def _out_of_place(timesteps: Tensor, dim: int, frequencies: Tensor) -> Tensor:
    """Same numbers as :func:`_direct` through out-of-place ops, for autograd and for ``torch.compile``.

    ``out=`` cannot record a graph for timesteps that require grad, and ``torch.compile`` traces this form (with
    ``frequencies`` computed inside the graph) into one graph.
    """
    args = timesteps.unsqueeze(1) * frequencies
    parts = [torch.cos(args), torch.sin(args)]
    if dim % 2:
        parts.append(args.new_zeros((timesteps.shape[0], 1)))
    return torch.cat(parts, dim=1)


@functools.lru_cache(maxsize=_TABLES)
def _table(dim: int, max_period: float, device: torch.device, length: int) -> Tensor:
    """Embeddings of the integer timesteps ``0 .. length - 1``, computed once by the same kernels as :func:`_direct`."""
    with torch.inference_mode(False), torch.no_grad():
        return _direct(torch.arange(length, dtype=torch.float32, device=device), dim, max_period)


def _lookup(timesteps: Tensor, dim: int, max_period: float) -> Tensor | None:
    """Gather rows of a cached table when ``timesteps`` are CPU integers in a small range, else ``None``.

    Elementwise sin/cos/mul give each element the same bits whatever the batch it sits in, so a row of the table is
    bitwise the row :func:`_direct` would compute; the gather skips the transcendental work. CPU only: checking the
    range on an accelerator would cost a host sync.
    """
    if timesteps.device.type != "cpu" or timesteps.numel() == 0:
        return None
    if timesteps.dtype.is_floating_point:
        index = timesteps.long()
        if not torch.equal(index.to(timesteps.dtype), timesteps) or bool(torch.signbit(timesteps).any()):
            return None  # fractional, non-finite or negative (-0.0 too: its sin keeps the sign) timesteps
    else:
        index = timesteps if timesteps.dtype in (torch.int64, torch.int32) else timesteps.long()
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0:
        return None
    length = max(_MIN_TABLE, 1 << int(hi).bit_length())
    if length * dim > _MAX_TABLE_ELEMENTS:
        return None
    return _table(dim, max_period, timesteps.device, length).index_select(0, index)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False) -> Tensor:
    r"""Create sinusoidal timestep embeddings, cos first.

    ``emb[n] = [cos(t_n f), sin(t_n f)]`` with ``f_i = exp(-ln(max_period) · i / (dim // 2))`` in float32, plus one
    zero column when ``dim`` is odd.

    Integer-valued timesteps on the CPU are gathered from a cached table of the embeddings of ``0 .. L-1`` (same
    bits, no sin/cos per call); other input is computed directly with the cached frequency row.

    Args:
        timesteps: 1-D tensor of ``N`` timesteps, one per sample; integer or floating (fractional values allowed).
            They are converted to float32 first, as CompVis does: pass integers or float32, not bf16 (bf16 turns
            999 into 1000).
        dim: Width of the embedding, ``>= 1``. ``dim = 1`` gives one zero column (CompVis gives shape ``(N, 0)``).
        max_period: Controls the lowest frequency, ``> 0``.
        repeat_only: Return ``timesteps`` broadcast to ``(N, dim)`` instead, in their own dtype (an expanded view,
            as CompVis' ``einops.repeat``).

    Returns:
        Float32 tensor of shape ``(N, dim)`` on ``timesteps``' device (``timesteps``' dtype with ``repeat_only``).

    Raises:
        TypeError: ``timesteps`` is not a real-valued tensor, or ``dim`` is not an integer.
        ValueError: ``timesteps`` is not 1-D, ``dim < 1`` or ``max_period <= 0``.

    Example:
        >>> timestep_embedding(torch.tensor([0, 500]), 4)
        tensor([[ 1.0000,  1.0000,  0.0000,  0.0000],
                [-0.8838,  0.2837, -0.4678, -0.9589]])
    """
    _validate(timesteps, dim, max_period)
    if repeat_only:
        return timesteps[:, None].expand(timesteps.shape[0], dim)
    max_period = float(max_period)
    half = dim // 2
    if torch.compiler.is_compiling():  # no caches, no host reads: one graph, the same kernels
        return _out_of_place(timesteps.float(), dim, _frequency_row(half, max_period, timesteps.device))
    if timesteps.requires_grad and torch.is_grad_enabled():
        return _out_of_place(timesteps.float(), dim, _frequencies(half, max_period, timesteps.device))
    out = _lookup(timesteps, dim, max_period)
    if out is not None:
        return out
    if timesteps.dtype != torch.float32:
        timesteps = timesteps.float()
    return _direct(timesteps, dim, max_period)


class SinusoidalTimestepEmbedding(nn.Module):
    """Module form of :func:`timestep_embedding`: bitwise the same numbers, sharing its cached frequency table.

    The table is not a buffer, so ``precision="bf16-true"``/``.half()`` cannot cast it: the embedding stays float32
    under every precision setting, and it follows ``timesteps``' device.

    Args:
        dim: Width of the embedding, ``>= 1``.
        max_period: Controls the lowest frequency, ``> 0``.

    Raises:
        TypeError: ``dim`` is not an integer or ``max_period`` is not a real number.
        ValueError: ``dim < 1`` or ``max_period <= 0``.
    """

    def __init__(self, dim: int, max_period: float = 10000) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        check_real("max_period", max_period, minimum=0.0, min_inclusive=False)
        self.max_period = max_period

    def forward(self, timesteps: Tensor) -> Tensor:
        """Embed ``timesteps`` (1-D, one per sample) into a float32 ``(N, dim)`` tensor."""
        return timestep_embedding(timesteps, self.dim, self.max_period)

    def extra_repr(self) -> str:
        """Show ``dim`` and ``max_period`` in the module's repr."""
        return f"dim={self.dim}, max_period={self.max_period}"
