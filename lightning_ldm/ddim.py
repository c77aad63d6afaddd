"""DDIM timesteps, sigmas, the update and the sampling loop. (Stub: being written.)"""

from __future__ import annotations

import numpy as np


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    raise NotImplementedError


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):  # type: ignore[no-untyped-def]
    raise NotImplementedError
