"""Seeds for the per-rank, per-batch generator of :class:`~lightning_ldm.callbacks.ScheduleCallback`."""

from __future__ import annotations

import os

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["DEFAULT_SEED", "derive_seed", "resolve_seed"]

#: Seed used when neither ``seed=`` nor ``PL_GLOBAL_SEED`` (set by ``seed_everything``) is given.
DEFAULT_SEED = 0


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, through numpy's ``SeedSequence`` (well-mixed, platform-stable).

    ``ScheduleCallback`` seeds training batch ``i`` of rank ``r`` with ``derive_seed(seed, 0, r, i)`` and validation
    batch ``j`` of dataloader ``d`` with ``derive_seed(seed, 1, r, d, j)``.

    Args:
        keys: Non-negative integers.

    Returns:
        An int in ``[0, 2**63)``, valid for ``torch.Generator.manual_seed``.
    """
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else ``PL_GLOBAL_SEED`` (negative values taken modulo 2**32), else :data:`DEFAULT_SEED`.

    Args:
        seed: An explicit non-negative seed, or ``None``.

    Returns:
        A non-negative seed.
    """
    if seed is not None:
        return seed
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            rank_zero_warn(f"PL_GLOBAL_SEED={env!r} is not an integer; ScheduleCallback uses seed {DEFAULT_SEED}")
            return DEFAULT_SEED
        return value if value >= 0 else value % 2**32
    return DEFAULT_SEED
