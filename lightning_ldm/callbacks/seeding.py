"""Seeds for the per-rank, per-batch generator of :class:`~lightning_ldm.callbacks.ScheduleCallback`."""

from __future__ import annotations

import os

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_ldm.seeding import derive_seed

__all__ = ["DEFAULT_SEED", "derive_seed", "resolve_seed"]

#: Seed used when neither ``seed=`` nor ``PL_GLOBAL_SEED`` (set by ``seed_everything``) is given.
DEFAULT_SEED = 0


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
