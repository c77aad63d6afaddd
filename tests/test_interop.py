"""Conversion to and from diffusers scheduler configs: values, round trips, errors; no diffusers import.

The check against diffusers' own schedulers lives in test_interop_diffusers.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from lightning_ldm import ddim, interop, schedules
from lightning_ldm.interop import from_diffusers_config, to_diffusers_config
from lightning_ldm.schedules import make_beta_schedule

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


ROUND_TRIP_KWARGS = (
    {"beta_schedule": "linear", "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012},
    {"beta_schedule": "sqrt_linear", "timesteps": 10, "zero_terminal_snr": True, "parameterization": "x0"},
    {"beta_schedule": "squaredcos_cap_v2", "timesteps": 50, "parameterization": "v"},
)


def test_from_diffusers_config_round_trips():
    for kwargs in ROUND_TRIP_KWARGS:
        back = from_diffusers_config(to_diffusers_config(**kwargs))
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
            r"config must be a mapping \(a diffusers scheduler config\), got .* of type list",
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
