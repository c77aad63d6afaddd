"""Beta schedules and the float64 tables derived from them. (Stub: being written.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

ScheduleName = Literal["linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt"]


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    raise NotImplementedError


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    raise NotImplementedError


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    raise NotImplementedError


def schedule_tables(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    raise NotImplementedError
