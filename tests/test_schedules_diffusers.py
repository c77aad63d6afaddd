"""Beta schedules and zero-terminal-SNR rescaling against diffusers' DDPMScheduler (which computes in float32).

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from lightning_ldm.schedules import make_beta_schedule, rescale_zero_terminal_snr
from tests.compvis_reference import SD_LINEAR as SD


# --- diffusers parity (diffusers computes its betas in float32) ------------------------------------------------------
@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        ("linear", "scaled_linear", SD),
        ("linear", "scaled_linear", {}),
        ("sqrt_linear", "linear", {}),
        ("sqrt_linear", "linear", SD),
        ("squaredcos_cap_v2", "squaredcos_cap_v2", {}),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_diffusers_parity(ours, theirs, kwargs):
    betas = make_beta_schedule(ours, 1000, **kwargs)
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=kwargs.get("linear_start", 1e-4),
        beta_end=kwargs.get("linear_end", 2e-2),
        beta_schedule=theirs,
    )
    ref = sched.betas.double().numpy()
    np.testing.assert_allclose(betas, ref, rtol=1e-6, atol=0)  # float32 rounding of the same numbers
    np.testing.assert_allclose(np.cumprod(1 - betas), sched.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-7)


def test_rescale_zero_terminal_snr_matches_diffusers():
    betas = make_beta_schedule("linear", 1000, **SD)
    ours = rescale_zero_terminal_snr(betas)
    assert ours.dtype == np.float64
    theirs = diffusers_rescale(torch.from_numpy(betas.copy())).numpy()  # their algorithm run in float64
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-14)
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    # the scheduler runs it in float32: the betas agree to float32 cancellation error (~1e-5 absolute)
    np.testing.assert_allclose(ours, sched.betas.double().numpy(), rtol=0, atol=2e-5)
