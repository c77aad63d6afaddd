"""NoiseSchedule against diffusers: a scheduler built from ``to_diffusers_config()`` noises, gives v-targets, SNRs and
Min-SNR weights like ours (to float32 rounding: diffusers computes its betas in float32).

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from lightning_ldm.noise_schedule import NoiseSchedule
from tests import compvis_reference as compvis

SCHEDULES = [
    {"beta_schedule": "linear", **compvis.SD_LINEAR},
    {"beta_schedule": "linear", "zero_terminal_snr": True, "parameterization": "v", **compvis.SD_LINEAR},
    {"beta_schedule": "cosine", "parameterization": "v"},
    {"beta_schedule": "sqrt_linear", "parameterization": "x0"},
]


def pair(kwargs: dict) -> tuple[NoiseSchedule, DDPMScheduler]:
    schedule = NoiseSchedule(timesteps=1000, **kwargs)
    return schedule, DDPMScheduler(**schedule.to_diffusers_config())


@pytest.mark.parametrize("kwargs", SCHEDULES)
def test_q_sample_and_get_v_match_diffusers(kwargs: dict) -> None:
    schedule, scheduler = pair(kwargs)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), rtol=0, atol=2e-5)
    torch.testing.assert_close(schedule.get_v(x0, noise, t), scheduler.get_velocity(x0, noise, t), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kwargs", SCHEDULES)
def test_snr_and_min_snr_weights_match_the_diffusers_training_scripts(kwargs: dict) -> None:
    schedule, scheduler = pair(kwargs)
    t = torch.arange(0, 1000, 7)
    theirs = compute_snr(scheduler, t)
    torch.testing.assert_close(schedule.snr(t), theirs, rtol=2e-3, atol=1e-6)
    gamma = 5.0
    # examples/text_to_image/train_text_to_image.py, with its "snr == 0 -> weight 1" rule
    weights = torch.stack([theirs, gamma * torch.ones_like(theirs)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        weights = weights / theirs
    elif scheduler.config.prediction_type == "v_prediction":
        weights = weights / (theirs + 1)
    weights[theirs == 0] = 1.0
    ours = schedule.loss_weights(t, "min_snr", gamma)
    assert ours is not None
    torch.testing.assert_close(ours, weights, rtol=2e-3, atol=1e-6)


def test_a_live_scheduler_config_gives_the_same_schedule() -> None:
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    schedule = NoiseSchedule.from_diffusers_config(scheduler.config)
    assert schedule.config.beta_schedule == "linear" and schedule.parameterization == "v"
    assert (schedule.config.linear_start, schedule.config.linear_end) == (0.00085, 0.012)
    torch.testing.assert_close(schedule.table("alphas_cumprod"), scheduler.alphas_cumprod, rtol=1e-6, atol=1e-7)
