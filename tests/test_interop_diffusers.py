"""Conversion to and from diffusers scheduler configs, checked against diffusers' own schedulers.

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from lightning_ldm.interop import from_diffusers_config, to_diffusers_config
from lightning_ldm.schedules import make_beta_schedule, rescale_zero_terminal_snr
from tests.test_interop import ROUND_TRIP_KWARGS, SD_CONFIG


def our_betas(kwargs):
    if kwargs.get("given_betas") is not None:
        betas = kwargs["given_betas"]
    else:
        betas = make_beta_schedule(
            kwargs["beta_schedule"], kwargs["timesteps"], kwargs["linear_start"], kwargs["linear_end"]
        )
    return rescale_zero_terminal_snr(betas) if kwargs["zero_terminal_snr"] else betas


@pytest.mark.parametrize(
    ("kwargs", "expected_schedule"),
    [
        ({"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}, "scaled_linear"),
        ({"beta_schedule": "sqrt_linear", "timesteps": 500}, "linear"),
        ({"beta_schedule": "cosine"}, "squaredcos_cap_v2"),
        ({"beta_schedule": "squaredcos_cap_v2", "parameterization": "v"}, "squaredcos_cap_v2"),
        ({"beta_schedule": "linear", "zero_terminal_snr": True, "parameterization": "v"}, "scaled_linear"),
        ({"beta_schedule": "sqrt_linear", "parameterization": "x0"}, "linear"),
    ],
)
def test_to_diffusers_config_builds_the_same_schedule(kwargs, expected_schedule):
    config = to_diffusers_config(**kwargs)
    assert config["beta_schedule"] == expected_schedule
    assert set(config) <= set(DDPMScheduler().config)  # only DDPMScheduler config keys
    for cls in (DDPMScheduler, DDIMScheduler):
        sched = cls(**config)
        assert (
            dict(sched.config)["prediction_type"]
            == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[kwargs.get("parameterization", "eps")]
        )
    sched = DDPMScheduler.from_config(config)
    ours = make_beta_schedule(
        kwargs["beta_schedule"],
        kwargs.get("timesteps", 1000),
        kwargs.get("linear_start", 1e-4),
        kwargs.get("linear_end", 2e-2),
    )
    if kwargs.get("zero_terminal_snr"):
        ours = rescale_zero_terminal_snr(ours)
    np.testing.assert_allclose(ours, sched.betas.double().numpy(), rtol=1e-6, atol=2e-5)


def test_from_diffusers_config_stable_diffusion_matches_diffusers():
    kwargs = from_diffusers_config(SD_CONFIG)
    sched = DDPMScheduler.from_config(SD_CONFIG)
    np.testing.assert_allclose(our_betas(kwargs), sched.betas.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        {},  # all DDPMScheduler defaults: diffusers "linear" is our "sqrt_linear"
        {"beta_schedule": "linear", "num_train_timesteps": 300, "prediction_type": "sample"},
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    ],
)
def test_from_diffusers_config_matches_diffusers(config):
    kwargs = from_diffusers_config(config)
    sched = DDPMScheduler(**config)
    np.testing.assert_allclose(our_betas(kwargs), sched.betas.double().numpy(), rtol=1e-6, atol=2e-5)
    assert kwargs["timesteps"] == sched.config.num_train_timesteps
    assert kwargs["zero_terminal_snr"] == sched.config.rescale_betas_zero_snr
    if not config:
        assert kwargs["beta_schedule"] == "sqrt_linear"


def test_from_diffusers_config_accepts_a_live_scheduler_config_and_round_trips():
    for kwargs in ROUND_TRIP_KWARGS:
        back = from_diffusers_config(DDIMScheduler(**to_diffusers_config(**kwargs)).config)
        for key, value in kwargs.items():
            assert back[key] == value, key


def test_trained_betas_match_diffusers():
    betas = make_beta_schedule("sqrt", 20).tolist()
    kwargs = from_diffusers_config({"trained_betas": betas, "num_train_timesteps": 20})
    np.testing.assert_array_equal(kwargs["given_betas"], betas)
    np.testing.assert_allclose(
        DDPMScheduler(trained_betas=betas, num_train_timesteps=20).betas.numpy(), betas, rtol=1e-7
    )
