"""Seed derivation shared by the per-batch generators (training draws, validation noise, sample noise)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, through numpy's ``SeedSequence`` (well-mixed, platform-stable).

    ``DiffusionSeedCallback`` seeds training batch ``i`` of rank ``r`` with ``derive_seed(seed, 0, r, i)`` and
    validation batch ``j`` of dataloader ``d`` with ``derive_seed(seed, 1, r, d, j)``.

    Args:
        keys: Non-negative integers.

    Returns:
        An int in ``[0, 2**63)``, valid for ``torch.Generator.manual_seed``.
    """
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
