"""Conversion to and from diffusers scheduler configs, checked against diffusers' own schedulers."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from lightning_ldm import ddim, interop, schedules
from lightning_ldm.interop import from_diffusers_config, to_diffusers_config
from lightning_ldm.schedules import make_beta_schedule, rescale_zero_terminal_snr

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler

SD_CONFIG = {  # Stable Diffusion v1's scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


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


def test_to_diffusers_config_values():
    assert to_diffusers_config("linear", 1000, 0.00085, 0.012, zero_terminal_snr=True, parameterization="v") == {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    }


def test_from_diffusers_config_stable_diffusion():
    kwargs = from_diffusers_config(SD_CONFIG)
    assert kwargs == {
        "given_betas": None,
        "beta_schedule": "linear",
        "timesteps": 1000,
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "zero_terminal_snr": False,
        "parameterization": "eps",
    }
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
    for kwargs in (
        {"beta_schedule": "linear", "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012},
        {"beta_schedule": "sqrt_linear", "timesteps": 10, "zero_terminal_snr": True, "parameterization": "x0"},
        {"beta_schedule": "squaredcos_cap_v2", "timesteps": 50, "parameterization": "v"},
    ):
        back = from_diffusers_config(DDIMScheduler(**to_diffusers_config(**kwargs)).config)
        for key, value in kwargs.items():
            assert back[key] == value, key
    assert from_diffusers_config(to_diffusers_config("cosine"))["beta_schedule"] == "squaredcos_cap_v2"


def test_from_diffusers_config_trained_betas():
    betas = make_beta_schedule("sqrt", 20).tolist()
    kwargs = from_diffusers_config({"trained_betas": betas, "num_train_timesteps": 20})
    assert kwargs["timesteps"] == 20
    assert kwargs["given_betas"].dtype == np.float64
    np.testing.assert_array_equal(kwargs["given_betas"], betas)
    assert from_diffusers_config({"trained_betas": betas})["timesteps"] == 20
    np.testing.assert_allclose(
        DDPMScheduler(trained_betas=betas, num_train_timesteps=20).betas.numpy(), betas, rtol=1e-7
    )


@pytest.mark.parametrize("module", [interop, schedules, ddim])
def test_no_diffusers_or_lightning_import(module):
    """The conversion works without diffusers; the functional core never imports Lightning."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {
        "__future__",
        "collections",
        "logging",
        "math",
        "numbers",
        "typing",
        "numpy",
        "torch",
        "lightning_ldm",
    }, roots


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"beta_schedule": "sqrt"},
            ValueError,
            r"beta_schedule='sqrt' has no diffusers equivalent; pass the betas instead: "
            r"trained_betas=make_beta_schedule",
        ),
        (
            {"beta_schedule": "cosine", "cosine_s": 0.01},
            ValueError,
            r"beta_schedule='cosine' with cosine_s=0.01 has no diffusers equivalent \(diffusers' 'squaredcos_cap_v2' "
            r"fixes cosine_s=0.008\)",
        ),
        ({"beta_schedule": "scaled_linear"}, ValueError, r"schedule='scaled_linear' is not supported; expected one of"),
        (
            {"parameterization": "epsilon"},
            ValueError,
            r"parameterization='epsilon' is not supported; expected one of "
            r"'eps', 'x0', 'v'",
        ),
        ({"timesteps": 0}, ValueError, r"n_timestep=0 is out of range"),
        ({"linear_start": -1.0}, ValueError, r"linear_start=-1 is out of range"),
        ({"zero_terminal_snr": "yes"}, TypeError, r"zero_terminal_snr must be a bool, got 'yes'"),
    ],
)
def test_to_diffusers_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        to_diffusers_config(**kwargs)


@pytest.mark.parametrize(
    ("config", "exc", "match"),
    [
        (
            [("beta_schedule", "linear")],
            TypeError,
            r"config must be a mapping \(a diffusers scheduler config\), got list",
        ),
        (
            {"beta_schedule": "sigmoid"},
            ValueError,
            r"config\['beta_schedule'\]='sigmoid' is not supported; expected one of 'scaled_linear', 'linear', "
            r"'squaredcos_cap_v2'",
        ),
        (
            {"prediction_type": "flow"},
            ValueError,
            r"config\['prediction_type'\]='flow' is not supported; expected one "
            r"of 'epsilon', 'sample', 'v_prediction'",
        ),
        ({"num_train_timesteps": 0}, ValueError, r"config\['num_train_timesteps'\]=0 is out of range"),
        ({"beta_start": -0.1}, ValueError, r"config\['beta_start'\]=-0.1 is out of range"),
        ({"rescale_betas_zero_snr": 1}, TypeError, r"config\['rescale_betas_zero_snr'\] must be a bool, got 1"),
        ({"trained_betas": [[0.1, 0.2]]}, ValueError, r"config\['trained_betas'\] must be a non-empty 1-D list"),
        ({"trained_betas": ["a"]}, ValueError, r"config\['trained_betas'\] must be a list of numbers"),
        (
            {"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000},
            ValueError,
            r"config\['num_train_timesteps'\]=1000 disagrees with len\(config\['trained_betas'\]\)=2",
        ),
    ],
)
def test_from_diffusers_config_errors(config, exc, match):
    with pytest.raises(exc, match=match):
        from_diffusers_config(config)
