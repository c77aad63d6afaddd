r"""AlphaBlender: mix a spatial and a temporal branch, as Stable Video Diffusion does.

.. math::

    \mathrm{out} = \alpha \cdot x_{\mathrm{spatial}} + (1 - \alpha) \cdot x_{\mathrm{temporal}}

computed as one ``torch.lerp(x_temporal, x_spatial, α)`` (one pass over memory instead of CompVis' three, and
exactly ``x_spatial`` where ``α = 1``, exactly ``x_temporal`` where ``α = 0``). ``α`` comes from the merge strategy:

* ``"fixed"``: ``α = mix_factor`` (a buffer, no sigmoid), ``alpha`` must lie in ``[0, 1]``;
* ``"learned"``: ``α = σ(mix_factor)`` (a parameter);
* ``"learned_with_images"``: ``α = 1`` for still-image frames (``image_only_indicator`` true), ``σ(mix_factor)``
  for video frames, the ``(B, T)`` map rearranged with ``rearrange_pattern`` (``"b t -> (b t) 1 1"`` for frames
  flattened into the batch, ``"b t -> b 1 t 1 1"`` for ``(B, C, T, H, W)`` tensors).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from einops import rearrange
from torch import Tensor, nn

from lightning_ldm._checks import check_choice, check_real, check_str

__all__ = ["MERGE_STRATEGIES", "AlphaBlender", "MergeStrategy"]

MergeStrategy = Literal["learned", "fixed", "learned_with_images"]
MERGE_STRATEGIES: tuple[str, ...] = get_args(MergeStrategy)


class AlphaBlender(nn.Module):
    """Blend ``x_spatial`` and ``x_temporal`` with a fixed or learned weight ``α`` on the spatial branch.

    Args:
        alpha: Initial value of ``mix_factor``: ``α`` itself for ``"fixed"`` (in ``[0, 1]``), the logit of ``α`` for
            the learned strategies (``0.5`` starts at ``α = σ(0.5) ≈ 0.62``).
        merge_strategy: ``"learned"``, ``"fixed"`` or ``"learned_with_images"``.
        rearrange_pattern: einops pattern that maps the ``(B, T)`` ``α`` of ``"learned_with_images"`` onto the
            tensors' layout. A result with fewer dimensions than the tensors is aligned on the batch dimension (the
            seed would broadcast it against the trailing dimensions instead).

    Attributes:
        mix_factor: Float32 tensor of shape ``(1,)`` under the state-dict key ``mix_factor``: a buffer for
            ``"fixed"``, an ``nn.Parameter`` for the learned strategies.

    Raises:
        ValueError: Unknown ``merge_strategy``, a non-finite ``alpha``, a ``"fixed"`` ``alpha`` outside ``[0, 1]``,
            or a ``rearrange_pattern`` that is not an einops pattern over ``b t``.
        TypeError: ``alpha`` is not a real number or ``rearrange_pattern`` is not a string.
    """

    strategies = MERGE_STRATEGIES
    mix_factor: Tensor

    def __init__(
        self,
        alpha: float,
        merge_strategy: MergeStrategy = "learned_with_images",
        rearrange_pattern: str = "b t -> (b t) 1 1",
    ) -> None:
        super().__init__()
        check_choice("merge_strategy", merge_strategy, MERGE_STRATEGIES)
        check_str("rearrange_pattern", rearrange_pattern)
        try:  # the pattern maps the (B, T) indicator: try it on a (2, 3) one now rather than at the first forward
            rearrange(torch.zeros(2, 3), rearrange_pattern)
        except Exception as err:  # einops raises EinopsError (a RuntimeError) with its own wording
            raise ValueError(
                f"rearrange_pattern={rearrange_pattern!r} is not an einops pattern over the (B, T) indicator 'b t'; "
                f"expected e.g. 'b t -> (b t) 1 1' or 'b t -> b 1 t 1 1' ({err.__class__.__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        if merge_strategy == "fixed":
            value = check_real("alpha", alpha, minimum=0.0, maximum=1.0)
        else:
            value = check_real("alpha", alpha)
        self.merge_strategy: MergeStrategy = merge_strategy
        self.rearrange_pattern = rearrange_pattern
        mix_factor = torch.tensor([value], dtype=torch.float32)
        if merge_strategy == "fixed":
            self.register_buffer("mix_factor", mix_factor)
        else:
            self.register_parameter("mix_factor", nn.Parameter(mix_factor))

    def get_alpha(self, image_only_indicator: Tensor | None = None) -> Tensor:
        """The blend weight ``α`` on the spatial branch, float32.

        Args:
            image_only_indicator: ``(B, T)`` tensor, true (non-zero) for still-image frames. Required for
                ``"learned_with_images"``, ignored by the other strategies.

        Returns:
            ``mix_factor`` (``"fixed"``) or ``σ(mix_factor)`` (``"learned"``), shape ``(1,)``; for
            ``"learned_with_images"`` ``where(indicator, 1, σ(mix_factor))`` rearranged with the pattern.

        Raises:
            ValueError: ``"learned_with_images"`` without an ``image_only_indicator`` or with one that is not 2-D.
        """
        if self.merge_strategy == "fixed":
            return self.mix_factor
        if self.merge_strategy == "learned":
            return torch.sigmoid(self.mix_factor)
        if image_only_indicator is None:
            raise ValueError(
                "merge_strategy='learned_with_images' needs image_only_indicator, a (B, T) tensor that is true for "
                "still-image frames; pass it, or use merge_strategy='learned' or 'fixed'"
            )
        if not isinstance(image_only_indicator, Tensor) or image_only_indicator.ndim != 2:
            shape = tuple(image_only_indicator.shape) if isinstance(image_only_indicator, Tensor) else None
            raise ValueError(
                "image_only_indicator must be a (B, T) tensor, got "
                + (f"shape {shape}" if shape is not None else type(image_only_indicator).__name__)
            )
        alpha = torch.where(image_only_indicator.bool(), 1.0, torch.sigmoid(self.mix_factor))
        return rearrange(alpha, self.rearrange_pattern)

    def forward(self, x_spatial: Tensor, x_temporal: Tensor, image_only_indicator: Tensor | None = None) -> Tensor:
        """Return ``α·x_spatial + (1 − α)·x_temporal`` with ``α`` cast to ``x_spatial``'s dtype.

        Args:
            x_spatial: Output of the spatial branch.
            x_temporal: Output of the temporal branch, same shape as ``x_spatial``.
            image_only_indicator: ``(B, T)`` still-image flags (see :meth:`get_alpha`).

        Returns:
            The blend, shape of the inputs, ``x_spatial``'s dtype (the promoted dtype if the two dtypes differ).

        Raises:
            ValueError: The shapes of ``x_spatial`` and ``x_temporal`` differ, ``α`` does not fit their layout, or
                ``image_only_indicator`` is missing or malformed for ``"learned_with_images"``.
        """
        if x_spatial.shape != x_temporal.shape:
            raise ValueError(
                f"x_spatial and x_temporal must have the same shape, got {tuple(x_spatial.shape)} and "
                f"{tuple(x_temporal.shape)}"
            )
        alpha = self.get_alpha(image_only_indicator)
        if alpha.ndim > 1:
            alpha = self._align(alpha, x_spatial)
        if x_temporal.dtype != x_spatial.dtype:  # CompVis' formula, with its type promotion
            return alpha.to(x_spatial.dtype) * x_spatial + (1.0 - alpha).to(x_spatial.dtype) * x_temporal
        return torch.lerp(x_temporal, x_spatial, alpha.to(x_spatial.dtype))

    def _align(self, alpha: Tensor, x: Tensor) -> Tensor:
        """Pad ``alpha`` with trailing singleton dims to ``x.ndim`` and check that it broadcasts against ``x``."""
        if alpha.ndim < x.ndim:
            alpha = alpha.reshape(*alpha.shape, *((1,) * (x.ndim - alpha.ndim)))
        if alpha.ndim > x.ndim or any(a not in (1, s) for a, s in zip(alpha.shape, x.shape, strict=True)):
            raise ValueError(
                f"alpha of shape {tuple(alpha.shape)} (from image_only_indicator through rearrange_pattern="
                f"{self.rearrange_pattern!r}) does not fit inputs of shape {tuple(x.shape)}"
            )
        return alpha

    def extra_repr(self) -> str:
        """Show the strategy and the pattern in the module's repr."""
        return f"merge_strategy={self.merge_strategy!r}, rearrange_pattern={self.rearrange_pattern!r}"
