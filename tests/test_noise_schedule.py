"""The schedule object: ScheduleConfig (validation, dict/JSON round trip, fingerprint), NoiseSchedule (tables against
CompVis' formulas, per-device copies, pickling, identities, posterior, SNR, loss weights, diffusers config) and the
check of tables stored in CompVis state dicts at float32/float16/bfloat16, directly and through ``load_state_dict``.

The oracle is ``tests/compvis_reference.py`` (CompVis' formulas, transcribed); diffusers parity lives in
``test_noise_schedule_diffusers.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_ldm.noise_schedule import SCHEDULE_TABLES, NoiseSchedule, vlb_weights
from lightning_ldm.schedule_config import FINGERPRINT_VERSION, ScheduleConfig, fingerprint_difference
from tests import compvis_reference as compvis
from tests.lightning_helpers import CompVisTinyDenoiser

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_NAMES = ("linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt")
#: The CompVis tables that ``register_schedule`` stores as buffers (the package's ``snr_table`` is not among them).
COMPVIS_BUFFERS = compvis.TABLE_NAMES[:-1]


def ours(name: str) -> str:
    """The package's name of a ``compvis.TABLE_NAMES`` table."""
    return "snr_table" if name == "snr" else name


def compvis_float32(betas: np.ndarray) -> dict[str, Tensor]:
    """The float32 buffers CompVis' ``register_schedule`` makes: ``torch.tensor(float64 table, dtype=float32)``."""
    tables = compvis.register_schedule_tables(betas)
    return {name: torch.tensor(tables[name], dtype=torch.float32) for name in COMPVIS_BUFFERS}


def rows(t: Tensor, ndim: int) -> tuple[int, ...]:
    return (t.shape[0], *([1] * (ndim - 1)))


# ================================================================================================ ScheduleConfig
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta_schedule": "quadratic"}, ValueError, r"beta_schedule='quadratic' is not supported; expected one of "),
        ({"beta_schedule": "given"}, ValueError, r"beta_schedule='given' is not supported"),
        ({"timesteps": 1}, ValueError, r"timesteps=1 is out of range; expected an integer >= 2"),
        ({"timesteps": 10.0}, TypeError, r"timesteps must be an integer, got 10.0 of type float"),
        ({"timesteps": True}, TypeError, r"timesteps must be an integer, got True of type bool"),
        ({"linear_start": -1e-4}, ValueError, r"linear_start=-0.0001 is out of range; expected a number in \[0, inf\]"),
        ({"linear_end": "0.02"}, TypeError, r"linear_end must be a real number, got '0.02' of type str"),
        ({"linear_end": float("nan")}, ValueError, r"linear_end=nan must be finite"),
        ({"cosine_s": -0.1}, ValueError, r"cosine_s=-0.1 is out of range"),
        ({"zero_terminal_snr": 1}, TypeError, r"zero_terminal_snr must be a bool, got 1 of type int"),
        ({"zero_terminal_snr": "yes"}, TypeError, r"zero_terminal_snr must be a bool"),
        ({"v_posterior": 1.5}, ValueError, r"v_posterior=1.5 is out of range; expected a number in \[0, 1\]"),
        ({"parameterization": "mu"}, ValueError, r"parameterization='mu' is not supported; expected one of 'eps', "),
        ({"given_betas": [0.1]}, ValueError, r"given_betas must be a 1-D array of at least 2 per-timestep betas"),
        ({"given_betas": [[0.1, 0.2]]}, ValueError, r"given_betas must be a 1-D array .* got shape \(1, 2\)"),
        ({"given_betas": "0.1,0.2"}, TypeError, r"given_betas must be a 1-D sequence, numpy array or tensor"),
        ({"given_betas": [0.1, 1.5, 0.2]}, ValueError, r"given_betas\[1\]=1.5 lies outside \[0, 1\)"),
        ({"given_betas": [0.1, float("nan")]}, ValueError, r"given_betas\[1\]=nan is not finite"),
        ({"given_betas": [-0.1, 0.2]}, ValueError, r"given_betas\[0\]=-0.1 lies outside"),
    ],
)
def test_config_refuses_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ScheduleConfig(**kwargs)


def test_config_normalises_its_fields() -> None:
    config = ScheduleConfig(timesteps=np.int64(50), linear_start=1, zero_terminal_snr=np.bool_(True))
    assert type(config.timesteps) is int and config.timesteps == 50
    assert type(config.linear_start) is float and config.linear_start == 1.0
    assert config.zero_terminal_snr is True
    given = ScheduleConfig(beta_schedule="cosine", timesteps=7, given_betas=torch.tensor([0.1, 0.2, 1.0]))
    assert given.beta_schedule == "given" and given.timesteps == 3  # given betas override the schedule and T
    assert given.given_betas == (pytest.approx(0.1), pytest.approx(0.2), 1.0)
    assert all(type(b) is float for b in given.given_betas)
    assert ScheduleConfig(given_betas=np.array([0.1, 0.2])) == ScheduleConfig(given_betas=(0.1, 0.2))
    assert hash(ScheduleConfig(given_betas=[0.1, 0.2])) == hash(ScheduleConfig(given_betas=(0.1, 0.2)))


def test_config_is_frozen() -> None:
    config = ScheduleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timesteps = 10  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.given_betas = (0.1, 0.2)  # type: ignore[misc]
    assert config.timesteps == 1000


@st.composite
def configs(draw: st.DrawFn) -> ScheduleConfig:
    real = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_subnormal=False)
    fields: dict[str, Any] = {
        "beta_schedule": draw(st.sampled_from(SCHEDULE_NAMES)),
        "timesteps": draw(st.integers(2, 5000)),
        "linear_start": draw(real),
        "linear_end": draw(real),
        "cosine_s": draw(real),
        "zero_terminal_snr": draw(st.booleans()),
        "v_posterior": draw(real),
        "parameterization": draw(st.sampled_from(["eps", "x0", "v"])),
    }
    if draw(st.booleans()):
        betas = draw(st.lists(st.floats(0.0, 0.999, allow_subnormal=False), min_size=2, max_size=20))
        fields["given_betas"] = betas
    return ScheduleConfig(**fields)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_to_dict_from_dict_round_trip_through_json(config: ScheduleConfig) -> None:
    values = config.to_dict()
    assert set(values) == {f.name for f in dataclasses.fields(ScheduleConfig)}
    assert ScheduleConfig.from_dict(values) == config
    assert ScheduleConfig.from_dict(json.loads(json.dumps(values))) == config
    assert ScheduleConfig.from_dict(values).fingerprint() == config.fingerprint()
    if config.given_betas is not None:  # the dict is also a valid register_schedule argument set
        assert values["beta_schedule"] in SCHEDULE_NAMES and values["given_betas"] == list(config.given_betas)


def test_from_dict_refuses_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule argument\(s\) \['n_steps', 'scale'\]; expected some of "):
        ScheduleConfig.from_dict({"timesteps": 10, "n_steps": 3, "scale": 1.0})
    with pytest.raises(TypeError, match=r"values must be a mapping of schedule arguments, got .* of type list"):
        ScheduleConfig.from_dict([("timesteps", 10)])  # type: ignore[arg-type]
    assert ScheduleConfig.from_dict({"timesteps": 10}) == ScheduleConfig(timesteps=10)
    with pytest.raises(ValueError, match=r"unknown schedule argument\(s\) \['foo'\]"):
        NoiseSchedule(foo=1)


# ---------------------------------------------------------------------------------------------- fingerprint
#: What a v0.1 checkpoint stored for the default schedule (DiffusionMixin.on_save_checkpoint), key order included.
V01_DEFAULT_FINGERPRINT = {
    "version": 1,
    "beta_schedule": "linear",
    "timesteps": 1000,
    "linear_start": 0.0001,
    "linear_end": 0.02,
    "zero_terminal_snr": False,
    "v_posterior": 0.0,
    "parameterization": "eps",
}


def test_fingerprint_of_the_defaults_is_what_v01_checkpoints_stored() -> None:
    fingerprint = ScheduleConfig().fingerprint()
    assert fingerprint == V01_DEFAULT_FINGERPRINT
    assert json.dumps(fingerprint) == json.dumps(V01_DEFAULT_FINGERPRINT)  # same keys, order and JSON types
    assert NoiseSchedule().fingerprint == V01_DEFAULT_FINGERPRINT
    assert FINGERPRINT_VERSION == 1


@pytest.mark.parametrize(
    ("schedule", "params"),
    [
        ("linear", ("linear_start", "linear_end")),
        ("sqrt_linear", ("linear_start", "linear_end")),
        ("sqrt", ("linear_start", "linear_end")),
        ("cosine", ("cosine_s",)),
        ("squaredcos_cap_v2", ()),
    ],
)
def test_fingerprint_keys_are_the_documented_ones(schedule: str, params: tuple[str, ...]) -> None:
    config = ScheduleConfig(beta_schedule=schedule, timesteps=30, linear_start=2e-4, cosine_s=0.01, v_posterior=0.5)
    expected: dict[str, Any] = {"version": 1, "beta_schedule": schedule, "timesteps": 30}
    expected.update({name: getattr(config, name) for name in params})
    expected.update(zero_terminal_snr=False, v_posterior=0.5, parameterization="eps")
    assert list(config.fingerprint().items()) == list(expected.items())


def test_fingerprint_of_given_betas_is_their_hash() -> None:
    betas = compvis.make_beta_schedule("cosine", 50)
    config = ScheduleConfig(given_betas=betas, parameterization="v", linear_start=0.5)
    digest = hashlib.sha256(np.asarray(betas, dtype="<f8").tobytes()).hexdigest()[:16]
    assert config.fingerprint() == {
        "version": 1,
        "beta_schedule": "given",
        "timesteps": 50,
        "betas_sha256": digest,
        "zero_terminal_snr": False,
        "v_posterior": 0.0,
        "parameterization": "v",
    }
    nudged = betas.copy()
    nudged[17] = np.nextafter(nudged[17], 1.0)  # one ulp
    assert ScheduleConfig(given_betas=nudged).fingerprint()["betas_sha256"] != digest


def test_fingerprint_difference_lists_each_changed_key() -> None:
    saved = ScheduleConfig().fingerprint()
    assert fingerprint_difference(saved, ScheduleConfig(linear_end=0.02 * (1 + 1e-14)).fingerprint()) == {}
    current = ScheduleConfig(beta_schedule="cosine", parameterization="v").fingerprint()
    assert fingerprint_difference(saved, current) == {
        "beta_schedule": ("linear", "cosine"),
        "cosine_s": (None, 0.008),
        "linear_end": (0.02, None),
        "linear_start": (0.0001, None),
        "parameterization": ("eps", "v"),
    }
    assert fingerprint_difference({"v_posterior": 0.0}, {"v_posterior": 1e-13}) == {"v_posterior": (0.0, 1e-13)}
    assert fingerprint_difference({"timesteps": 1000}, {"timesteps": 1001}) == {"timesteps": (1000, 1001)}


# ====================================================================================== NoiseSchedule tables
REFERENCE_CASES = [
    *[(name, 1000, {}) for name in SCHEDULE_NAMES],
    ("linear", 1000, compvis.SD_LINEAR),
    ("linear", 20, {}),
    ("cosine", 50, {"cosine_s": 0.02}),
    ("sqrt", 10, {"linear_start": 0.01, "linear_end": 0.5}),
    ("sqrt_linear", 2, {}),
]


@pytest.mark.parametrize(("schedule", "n", "kwargs"), REFERENCE_CASES)
@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
def test_float64_tables_are_compvis_bitwise(
    schedule: str, n: int, kwargs: dict[str, float], v_posterior: float
) -> None:
    betas = compvis.make_beta_schedule(schedule, n, **kwargs)
    reference = compvis.register_schedule_tables(betas, v_posterior)
    assert (reference["alphas_cumprod"] > 0).all() and (reference["alphas_cumprod"] < 1).all()  # the bitwise regime
    schedule_obj = NoiseSchedule(beta_schedule=schedule, timesteps=n, v_posterior=v_posterior, **kwargs)
    tables = schedule_obj.tables_float64
    assert tuple(tables) == SCHEDULE_TABLES
    for name, expected in reference.items():
        got = tables[ours(name)]
        assert got.dtype == np.float64 and got.shape == (n,)
        np.testing.assert_array_equal(got, expected, err_msg=name, strict=True)
    for parameterization in ("eps", "x0", "v"):
        weights = NoiseSchedule(
            ScheduleConfig.from_dict({**schedule_obj.config.to_dict(), "parameterization": parameterization})
        )
        np.testing.assert_array_equal(
            weights.tables_float64["lvlb_weights"], compvis.lvlb_weights(betas, parameterization, v_posterior)
        )


def test_sqrt_schedule_keeps_its_huge_reciprocals() -> None:
    """No cap: √(1/ā) of the "sqrt" schedule at T = 1000 reaches ~5.6e21, CompVis' number, which float32 holds."""
    reference = compvis.register_schedule_tables(compvis.make_beta_schedule("sqrt", 1000))
    schedule = NoiseSchedule(beta_schedule="sqrt", timesteps=1000)
    top = schedule.tables_float64["sqrt_recip_alphas_cumprod"][-1]
    assert top == reference["sqrt_recip_alphas_cumprod"][-1]
    assert 5.5e21 < top < 5.7e21
    as32 = schedule.table("sqrt_recip_alphas_cumprod")
    assert float(as32[-1]) == float(np.float32(top)) and torch.isfinite(as32).all()


def test_zero_terminal_snr_tables_match_compvis_where_the_reference_is_finite() -> None:
    betas = compvis.rescale_zero_terminal_snr(compvis.make_beta_schedule("linear", 100, **compvis.SD_LINEAR))
    reference = compvis.register_schedule_tables(betas)
    schedule = NoiseSchedule(beta_schedule="linear", timesteps=100, zero_terminal_snr=True, **compvis.SD_LINEAR)
    for name, expected in reference.items():
        got = schedule.tables_float64[ours(name)]
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12, atol=0, err_msg=name)
        assert np.isfinite(got).all(), name  # the package replaces the reference's inf/nan at ā = 0
    assert schedule.tables_float64["alphas_cumprod"][-1] == 0.0 and schedule.tables_float64["snr_table"][-1] == 0.0


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_float32_tables_are_the_float64_ones_rounded(schedule: str) -> None:
    noise_schedule = NoiseSchedule(beta_schedule=schedule, timesteps=1000, parameterization="x0")
    for name in SCHEDULE_TABLES:
        table = noise_schedule.table(name)
        assert table.dtype == torch.float32 and table.device.type == "cpu" and table.shape == (1000,)
        assert torch.equal(table, torch.from_numpy(np.array(noise_schedule.tables_float64[name])).float()), name
    exact = NoiseSchedule(beta_schedule=schedule, timesteps=1000, table_dtype=torch.float64)
    for name in SCHEDULE_TABLES:
        assert exact.table(name).dtype == torch.float64
        np.testing.assert_array_equal(exact.table(name).numpy(), exact.tables_float64[name])


def test_tables_are_copied_once_per_device_and_read_only_in_float64() -> None:
    schedule = NoiseSchedule(timesteps=10)
    first = schedule.table("betas")
    for again in (
        schedule.table("betas"),
        schedule.table("betas", "cpu"),
        schedule.table("betas", torch.device("cpu")),
    ):
        assert again.data_ptr() == first.data_ptr()  # the cached copy, not a new one
    assert schedule.table("alphas_cumprod").untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="read-only"):
        schedule.tables_float64["betas"][0] = 0.5
    with pytest.raises(TypeError):
        schedule.tables_float64["betas"] = np.zeros(10)  # type: ignore[index]
    with pytest.raises(ValueError, match=r"name='snr' is not supported; expected one of 'betas', "):
        schedule.table("snr")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tables_are_copied_once_to_cuda() -> None:
    schedule = NoiseSchedule(beta_schedule="cosine", timesteps=100)
    on_gpu = schedule.table("alphas_cumprod", "cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert schedule.table("alphas_cumprod", "cuda").data_ptr() == on_gpu.data_ptr()
    assert torch.equal(on_gpu.cpu(), schedule.table("alphas_cumprod"))
    x, t = torch.randn(4, 3, device="cuda"), torch.tensor([0, 1, 50, 99], device="cuda")
    torch.testing.assert_close(schedule.q_sample(x, t, x).cpu(), schedule.q_sample(x.cpu(), t.cpu(), x.cpu()))


def test_schedule_ignores_the_default_device_and_inference_mode() -> None:
    reference = NoiseSchedule(timesteps=10)
    with torch.device("meta"):
        on_meta = NoiseSchedule(timesteps=10)  # e.g. under Trainer.init_module(empty_init=True)
    with torch.inference_mode():
        in_inference = NoiseSchedule(timesteps=10)
    for schedule in (on_meta, in_inference):
        assert torch.equal(schedule.table("alphas_cumprod"), reference.table("alphas_cumprod"))
    x = torch.randn(3, 4, requires_grad=True)
    out = in_inference.q_sample(x, torch.tensor([0, 4, 9]), torch.zeros(3, 4))
    out.sum().backward()  # tables made under inference_mode still serve autograd
    expected = reference.table("sqrt_alphas_cumprod")[[0, 4, 9]]
    assert torch.equal(x.grad, expected[:, None].expand(3, 4))  # type: ignore[arg-type]


def test_constructor_refuses_bad_arguments() -> None:
    with pytest.raises(
        TypeError, match=r"pass either a ScheduleConfig or its fields, not both \(got config and \['timesteps'\]\)"
    ):
        NoiseSchedule(ScheduleConfig(), timesteps=10)
    with pytest.raises(TypeError, match=r"config must be a ScheduleConfig, got dict"):
        NoiseSchedule({"timesteps": 10})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"table_dtype=torch.float16 is not supported; expected torch.float32 or "):
        NoiseSchedule(table_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"beta\[815\]=1.00201.* lies outside \[0, 1\)"):
        NoiseSchedule(linear_end=1.5)
    with pytest.raises(ValueError, match=r"non-finite sqrt_recip_alphas_cumprod in torch.float32 \(betas \[0.9, "):
        NoiseSchedule(given_betas=[0.9] * 80)  # ā = 1e-80: √(1/ā) = 1e40 overflows float32
    exact = NoiseSchedule(given_betas=[0.9] * 80, table_dtype=torch.float64)  # ... but not float64
    assert math.isclose(float(exact.table("sqrt_recip_alphas_cumprod")[-1]), 1e40, rel_tol=1e-9)


@pytest.mark.parametrize("clone", [lambda s: pickle.loads(pickle.dumps(s)), copy.deepcopy])
def test_pickle_and_deepcopy_round_trip(clone: Any) -> None:
    schedule = NoiseSchedule(beta_schedule="cosine", timesteps=40, parameterization="v", table_dtype=torch.float64)
    copied = clone(schedule)
    assert copied.config == schedule.config and copied.table_dtype == torch.float64
    assert copied.fingerprint == schedule.fingerprint and repr(copied) == repr(schedule)
    for name in SCHEDULE_TABLES:
        np.testing.assert_array_equal(copied.tables_float64[name], schedule.tables_float64[name])
        assert torch.equal(copied.table(name), schedule.table(name))
        with pytest.raises(ValueError, match="read-only"):
            copied.tables_float64[name][0] = 1.0
    x, noise, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 39])
    assert torch.equal(copied.q_sample(x, t, noise), schedule.q_sample(x, t, noise))


def test_repr_names_the_config_without_the_betas() -> None:
    text = repr(NoiseSchedule(given_betas=[0.1] * 500))
    assert text.startswith("NoiseSchedule(ScheduleConfig(beta_schedule='given', timesteps=500, ")
    assert text.endswith("table_dtype=torch.float32)") and len(text) < 300


# ============================================================================================== identities
def schedule_and_reference(**kwargs: Any) -> tuple[NoiseSchedule, dict[str, Tensor]]:
    schedule = NoiseSchedule(**kwargs)
    config = schedule.config
    betas = compvis.make_beta_schedule(
        config.beta_schedule, config.timesteps, config.linear_start, config.linear_end, config.cosine_s
    )
    tables = compvis.register_schedule_tables(betas, config.v_posterior)
    return schedule, {name: torch.tensor(table, dtype=torch.float32) for name, table in tables.items()}


@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 4, 4), (5,)])
def test_identities_are_the_compvis_float32_formulas(shape: tuple[int, ...]) -> None:
    schedule, ref = schedule_and_reference(beta_schedule="cosine", timesteps=200)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 1, 57, 198, 199])

    def term(name: str, value: Tensor) -> Tensor:  # CompVis: extract_into_tensor(table, t, x.shape) * value
        return ref[name].gather(-1, t).reshape(rows(t, len(shape))) * value

    a, b = "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"
    assert torch.equal(schedule.q_sample(x, t, y), term(a, x) + term(b, y))
    assert torch.equal(schedule.get_v(x, y, t), term(a, y) - term(b, x))
    assert torch.equal(schedule.predict_start_from_v(x, t, y), term(a, x) - term(b, y))
    assert torch.equal(schedule.predict_noise_from_v(x, t, y), term(a, y) + term(b, x))
    expected = term("sqrt_recip_alphas_cumprod", x) - term("sqrt_recipm1_alphas_cumprod", y)
    assert torch.equal(schedule.predict_start_from_noise(x, t, y), expected)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 99), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_identities_invert_each_other(t_list: list[int], seed: int) -> None:
    schedule = NoiseSchedule(beta_schedule="linear", timesteps=100, table_dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(t_list), 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t_list), 4, generator=g, dtype=torch.float64)
    t = torch.tensor(t_list)
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.get_v(x0, eps, t)
    torch.testing.assert_close(schedule.predict_start_from_v(x_t, t, v), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.predict_noise_from_v(x_t, t, v), eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.predict_start_from_noise(x_t, t, eps), x0, rtol=0, atol=2e-4)


def test_identities_keep_the_sample_dtype_and_device() -> None:
    schedule = NoiseSchedule(timesteps=10)
    t = torch.tensor([0, 9])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(2, 3).to(dtype)
        for out in (schedule.q_sample(x, t, x), schedule.get_v(x, x, t), schedule.predict_start_from_noise(x, t, x)):
            assert out.dtype == dtype and out.device == x.device


def test_identities_refuse_bad_timesteps_and_samples() -> None:
    schedule = NoiseSchedule(timesteps=10)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"t holds timestep 10, outside the valid range \[0, 9\] .*first at index 1"):
        schedule.q_sample(x, torch.tensor([3, 10]), x)
    with pytest.raises(TypeError, match=r"t must hold integer timesteps .* got dtype torch.float32"):
        schedule.get_v(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"t has 3 timesteps but x_start has batch size 2"):
        schedule.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(TypeError, match=r"x_start must be a floating tensor"):
        schedule.q_sample(torch.ones(2, 3, dtype=torch.long), torch.tensor([1, 2]), x)
    with pytest.raises(ValueError, match=r"must have the same shape, got \(2, 3\) and \(2, 4\)"):
        schedule.q_sample(x, torch.tensor([1, 2]), torch.randn(2, 4))


@pytest.mark.parametrize("v_posterior", [0.0, 0.4])
def test_q_posterior_is_the_compvis_posterior(v_posterior: float) -> None:
    schedule, ref = schedule_and_reference(beta_schedule="linear", timesteps=50, v_posterior=v_posterior)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t = torch.tensor([0, 1, 25, 49])
    mean, variance, log_variance = schedule.q_posterior(x0, x_t, t)
    shape = rows(t, 3)
    c1 = ref["posterior_mean_coef1"][t].reshape(shape)
    c2 = ref["posterior_mean_coef2"][t].reshape(shape)
    assert torch.equal(mean, c1 * x0 + c2 * x_t)
    assert torch.equal(variance, ref["posterior_variance"][t].reshape(shape))
    assert torch.equal(log_variance, ref["posterior_log_variance_clipped"][t].reshape(shape))
    assert variance.dtype == log_variance.dtype == torch.float32
    assert float(variance[0]) == v_posterior * float(ref["betas"][0])  # (1 − v)·β̃_0 = 0 at t = 0
    assert float(log_variance[0]) == pytest.approx(math.log(max(v_posterior * 1e-4, 1e-20)), rel=1e-6)
    betas = compvis.make_beta_schedule("linear", 50).astype(np.float64)  # the posterior mean from its definition
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    k = 25
    coef1 = betas[k] * math.sqrt(abar_prev[k]) / (1 - abar[k])
    coef2 = (1 - abar_prev[k]) * math.sqrt(1 - betas[k]) / (1 - abar[k])
    torch.testing.assert_close(mean[2].double(), coef1 * x0[2].double() + coef2 * x_t[2].double(), rtol=1e-6, atol=1e-6)


def test_snr_is_abar_over_one_minus_abar() -> None:
    schedule, ref = schedule_and_reference(beta_schedule="sqrt_linear", timesteps=100)
    t = torch.tensor([0, 50, 99])
    assert torch.equal(schedule.snr(t), ref["snr"][t])
    abar = np.cumprod(1 - np.linspace(1e-4, 2e-2, 100))
    np.testing.assert_allclose(schedule.snr(t).double().numpy(), (abar / (1 - abar))[[0, 50, 99]], rtol=1e-6)
    zsnr = NoiseSchedule(timesteps=100, zero_terminal_snr=True, parameterization="v")
    snr = zsnr.snr(torch.arange(100))
    assert float(snr[-1]) == 0.0 and bool((snr[:-1] > 0).all()) and bool((snr[1:] <= snr[:-1]).all())
    with pytest.raises(ValueError, match=r"t must be 1-D with one timestep per sample, got shape \(2, 1\)"):
        schedule.snr(torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"t holds timestep -1"):
        schedule.snr(torch.tensor([-1]))


def min_snr_formula(snr: np.ndarray, gamma: float, parameterization: str) -> np.ndarray:
    clipped = np.minimum(snr, gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = {"eps": gamma / np.maximum(snr, gamma), "x0": clipped, "v": clipped / (snr + 1)}[parameterization]
    return np.where(snr == 0, 1.0, weights)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_loss_weights_follow_their_formulas(parameterization: str, zero_terminal_snr: bool, gamma: float) -> None:
    schedule = NoiseSchedule(timesteps=200, zero_terminal_snr=zero_terminal_snr, parameterization=parameterization)
    t = torch.arange(200)
    assert schedule.loss_weights(t, "none") is None
    snr64 = schedule.tables_float64["snr_table"]
    weights = schedule.loss_weights(t, "min_snr", gamma)
    assert weights is not None and weights.dtype == torch.float32 and weights.shape == (200,)
    np.testing.assert_allclose(weights.double().numpy(), min_snr_formula(snr64, gamma, parameterization), rtol=1e-6)
    assert bool(torch.isfinite(weights).all())
    if zero_terminal_snr:
        assert float(weights[-1]) == 1.0  # the terminal step still trains
    if parameterization == "eps":  # γ/max(s, γ): 1 at the noisy end, γ/s at the clean end
        assert float(weights[-2]) == 1.0 and float(weights[0]) == pytest.approx(gamma / snr64[0], rel=1e-6)
    vlb = schedule.loss_weights(t, "vlb")
    betas = compvis.make_beta_schedule("linear", 200)
    if zero_terminal_snr:
        betas = compvis.rescale_zero_terminal_snr(betas)
    expected = compvis.lvlb_weights(betas, parameterization)
    finite = np.isfinite(expected)
    assert vlb is not None and torch.equal(vlb[torch.from_numpy(finite)], torch.tensor(expected[finite]).float())
    assert bool(torch.isfinite(vlb).all())


def test_loss_weights_refuse_bad_arguments() -> None:
    schedule = NoiseSchedule(timesteps=10)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"loss_weighting='snr' is not supported; expected one of 'none', 'min_snr'"):
        schedule.loss_weights(t, "snr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"min_snr_gamma=0 is out of range; expected a number in \(0, inf\]"):
        schedule.loss_weights(t, "min_snr", 0.0)
    with pytest.raises(TypeError, match=r"min_snr_gamma must be a real number"):
        schedule.loss_weights(t, "min_snr", "5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"t holds timestep 10"):
        schedule.loss_weights(torch.tensor([10]), "vlb")
    unchecked = schedule._loss_weights(torch.tensor([3]), "vlb", 5.0)
    assert unchecked is not None and float(unchecked[0]) == float(schedule.table("lvlb_weights")[3])


def test_vlb_weights_fill_non_finite_entries_from_the_nearest_finite_one() -> None:
    betas = np.array([0.0, 0.0, 0.1, 0.2, 0.3, 0.25, 1.0])  # 0/0 and x/0 at the start, α_T = 0 at the end
    reference = compvis.lvlb_weights(betas, "eps")
    finite = [j for j in range(7) if np.isfinite(reference[j])]
    assert 0 < len(finite) < 7
    expected = [reference[min(finite, key=lambda j: (abs(j - i), -j))] for i in range(7)]  # ties: the later one
    schedule = NoiseSchedule(given_betas=betas)
    np.testing.assert_array_equal(vlb_weights(schedule.tables_float64, "eps"), expected)
    np.testing.assert_array_equal(schedule.tables_float64["lvlb_weights"], expected)
    np.testing.assert_array_equal(vlb_weights(schedule.tables_float64, "v"), np.ones(7))


# ================================================================================================= diffusers
def test_to_diffusers_config_of_stable_diffusion() -> None:
    schedule = NoiseSchedule(beta_schedule="linear", timesteps=1000, parameterization="v", **compvis.SD_LINEAR)
    assert schedule.to_diffusers_config() == {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": False,
    }
    back = NoiseSchedule.from_diffusers_config(schedule.to_diffusers_config())
    assert back.config == schedule.config and back.fingerprint == schedule.fingerprint


@pytest.mark.parametrize(
    "config",
    [
        ScheduleConfig(beta_schedule="sqrt_linear", timesteps=50, zero_terminal_snr=True, parameterization="x0"),
        ScheduleConfig(given_betas=list(compvis.make_beta_schedule("cosine", 30)), parameterization="v"),
        ScheduleConfig(beta_schedule="squaredcos_cap_v2", timesteps=100),
    ],
)
def test_diffusers_config_round_trip(config: ScheduleConfig) -> None:
    schedule = NoiseSchedule(config)
    back = NoiseSchedule.from_diffusers_config(json.loads(json.dumps(schedule.to_diffusers_config())))
    assert back.config == config
    for name in SCHEDULE_TABLES:
        np.testing.assert_array_equal(back.tables_float64[name], schedule.tables_float64[name])


def test_cosine_goes_to_diffusers_as_squaredcos_with_the_same_betas() -> None:
    cosine = NoiseSchedule(beta_schedule="cosine", timesteps=1000)
    back = NoiseSchedule.from_diffusers_config(cosine.to_diffusers_config(), table_dtype=torch.float64)
    assert back.config.beta_schedule == "squaredcos_cap_v2" and back.table_dtype == torch.float64
    np.testing.assert_allclose(back.tables_float64["betas"], cosine.tables_float64["betas"], rtol=1e-12, atol=1e-15)


def test_schedules_without_a_diffusers_name_are_refused() -> None:
    with pytest.raises(ValueError, match=r"beta_schedule='sqrt' has no diffusers equivalent; pass the betas instead"):
        NoiseSchedule(beta_schedule="sqrt", timesteps=10).to_diffusers_config()
    with pytest.raises(ValueError, match=r"beta_schedule='cosine' with cosine_s=0.02 has no diffusers equivalent"):
        NoiseSchedule(beta_schedule="cosine", timesteps=10, cosine_s=0.02).to_diffusers_config()
    with pytest.raises(ValueError, match=r"config\['prediction_type'\]='sample_eps' is not supported"):
        NoiseSchedule.from_diffusers_config({"prediction_type": "sample_eps"})


# ================================================================= tables stored in CompVis state dicts
STORED_CASES = [("linear", {}), ("linear", compvis.SD_LINEAR), ("cosine", {}), ("sqrt_linear", {}), ("sqrt", {})]
HALF_CASTS = {torch.float32: lambda t: t, torch.float16: Tensor.half, torch.bfloat16: Tensor.bfloat16}


@pytest.mark.parametrize(("schedule", "kwargs"), STORED_CASES)
@pytest.mark.parametrize("dtype", list(HALF_CASTS))
def test_compvis_tables_exported_at_any_precision_are_accepted(
    schedule: str, kwargs: dict[str, float], dtype: torch.dtype
) -> None:
    noise_schedule = NoiseSchedule(beta_schedule=schedule, timesteps=1000, **kwargs)
    for name, table in compvis_float32(compvis.make_beta_schedule(schedule, 1000, **kwargs)).items():
        stored = HALF_CASTS[dtype](table)  # what `.half()` / `.bfloat16()` of a CompVis model exports
        assert stored.dtype == dtype
        assert noise_schedule.stored_table_mismatch(name, stored) is None, name


@pytest.mark.parametrize("dtype", list(HALF_CASTS))
def test_an_altered_stored_table_is_refused_at_its_precision(dtype: torch.dtype) -> None:
    schedule = NoiseSchedule(beta_schedule="linear", timesteps=1000, **compvis.SD_LINEAR)
    float64 = compvis.register_schedule_tables(compvis.make_beta_schedule("linear", 1000, **compvis.SD_LINEAR))
    stored = HALF_CASTS[dtype](torch.tensor(float64["alphas_cumprod"], dtype=torch.float32)).clone()
    stored[321] = stored[321] * 1.05
    expected = float(torch.tensor(float64["alphas_cumprod"][321]).to(dtype))
    message = schedule.stored_table_mismatch("alphas_cumprod", stored)
    assert message == (
        f"differs at {dtype} precision (the dtype it was stored in) from the registered schedule's: "
        f"index 321 holds {float(stored[321]):.6g}, expected {expected:.6g}"
    )


def test_a_table_one_ulp_off_in_bfloat16_is_refused_where_it_matters() -> None:
    """bf16 keeps 8 bits: a table off by more than one bf16 ulp, however small in float32 terms, is refused."""
    schedule = NoiseSchedule(timesteps=100)
    exact = torch.from_numpy(np.array(schedule.tables_float64["sqrt_recip_alphas_cumprod"])).bfloat16()
    assert schedule.stored_table_mismatch("sqrt_recip_alphas_cumprod", exact) is None
    value = float(exact[60])
    ulp = 2.0 ** (math.floor(math.log2(value)) - 7)  # bf16 keeps 8 significant bits
    one_up, two_up = exact.clone(), exact.clone()
    one_up[60], two_up[60] = value + ulp, value + 2 * ulp
    assert float(one_up[60]) == value + ulp and float(two_up[60]) == value + 2 * ulp  # exactly representable
    assert schedule.stored_table_mismatch("sqrt_recip_alphas_cumprod", one_up) is None  # double rounding: 1 ulp
    shifted = two_up
    message = schedule.stored_table_mismatch("sqrt_recip_alphas_cumprod", shifted)
    assert message is not None and "torch.bfloat16 precision" in message and "index 60 holds" in message


@pytest.mark.parametrize(
    ("stored", "match"),
    [
        (
            torch.zeros(50),
            r"^is a tensor of shape \(50,\), dtype torch.float32, min 0, max 0; expected a floating "
            r"tensor of shape \(100,\)$",
        ),
        (torch.zeros(100, dtype=torch.long), r"dtype torch.int64.*expected a floating tensor of shape \(100,\)"),
        ([0.1] * 100, r"^is \[0.1, 0.1, .*\.\.\. \(list\); expected a floating tensor"),
    ],
)
def test_a_stored_table_of_the_wrong_kind_is_described(stored: Any, match: str) -> None:
    message = NoiseSchedule(timesteps=100).stored_table_mismatch("betas", stored)
    assert message is not None
    assert re.search(match, message), message


def test_a_nan_in_a_stored_table_is_refused() -> None:
    schedule = NoiseSchedule(timesteps=100)
    stored = schedule.table("posterior_variance").clone()
    stored[7] = float("nan")
    assert schedule.stored_table_mismatch("posterior_variance", stored) == (
        "differs at torch.float32 precision (the dtype it was stored in) from the registered schedule's: "
        f"index 7 holds nan, expected {float(schedule.table('posterior_variance')[7]):.6g}"
    )


# ------------------------------------------------------------------------------------ through load_state_dict
def compvis_state_dict(model: nn.Module, dtype: torch.dtype, prefix: str = "") -> dict[str, Tensor]:
    """``model``'s weights plus the CompVis buffers of CompVisTinyDenoiser's schedule, exported at ``dtype``."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    betas = compvis.make_beta_schedule("linear", 20)
    for name, table in compvis_float32(betas).items():
        state[prefix + name] = HALF_CASTS[dtype](table)
    state[prefix + "lvlb_weights"] = HALF_CASTS[dtype](torch.tensor(compvis.lvlb_weights(betas), dtype=torch.float32))
    return state


@pytest.mark.parametrize("dtype", list(HALF_CASTS))
@pytest.mark.parametrize("strict", [True, False])
def test_mixin_loads_compvis_state_dicts_with_half_tables(dtype: torch.dtype, strict: bool) -> None:
    source = CompVisTinyDenoiser()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    state = compvis_state_dict(source, dtype)
    target = CompVisTinyDenoiser()
    result = target.load_state_dict(state, strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, p in target.named_parameters():
        assert torch.equal(p, source.get_parameter(name)), name
    assert target.alphas_cumprod.dtype == torch.float32  # the tables are ours, not the stored ones
    assert torch.equal(target.alphas_cumprod, CompVisTinyDenoiser().alphas_cumprod)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixin_refuses_a_differing_half_table_even_when_not_strict(strict: bool, dtype: torch.dtype) -> None:
    source = CompVisTinyDenoiser()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(-1.0)
    state = compvis_state_dict(source, dtype)
    state["sqrt_one_minus_alphas_cumprod"] = state["sqrt_one_minus_alphas_cumprod"].clone()
    state["sqrt_one_minus_alphas_cumprod"][5] *= 1.1
    target = CompVisTinyDenoiser()
    with pytest.raises(
        RuntimeError,
        match=rf"schedule table 'sqrt_one_minus_alphas_cumprod' differs at {dtype} precision \(the dtype it was "
        r"stored in\).*index 5 holds .*check_schedule_on_load = False",
    ):
        target.load_state_dict(state, strict=strict)
    target.check_schedule_on_load = False
    target.load_state_dict(state, strict=strict)  # opted out: the weights load, the table is dropped
    assert torch.equal(target.net.out.weight, source.net.out.weight)
    assert torch.equal(target.sqrt_one_minus_alphas_cumprod, CompVisTinyDenoiser().sqrt_one_minus_alphas_cumprod)


def test_nested_mixin_checks_its_own_prefix() -> None:
    """A LatentDiffusion-like wrapper: the mixin module sits under ``model.`` and its tables under that prefix."""
    wrapper = nn.ModuleDict({"model": CompVisTinyDenoiser()})
    state = compvis_state_dict(wrapper["model"], torch.float16, prefix="model.")
    assert nn.ModuleDict({"model": CompVisTinyDenoiser()}).load_state_dict(state, strict=True).unexpected_keys == []
    state["model.betas"] = torch.flip(state["model.betas"], [0])
    with pytest.raises(RuntimeError, match=r"schedule table 'model.betas' differs at torch.float16 precision"):
        nn.ModuleDict({"model": CompVisTinyDenoiser()}).load_state_dict(state, strict=False)


# ====================================================================== plain PyTorch, with Lightning unimportable
TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys

    class _NoLightning:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
                raise ImportError(f"lightning is not installed in this test ({name})")
            return None

    sys.meta_path.insert(0, _NoLightning())
    try:
        import lightning  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import torch
    from torch import nn

    from lightning_ldm.losses import diffusion_loss
    from lightning_ldm.noise_schedule import NoiseSchedule

    torch.manual_seed(0)
    schedule = NoiseSchedule(beta_schedule="cosine", timesteps=100, parameterization="v")


    class Net(nn.Module):
        def __init__(self, dim=8, hidden=64):
            super().__init__()
            self.emb = nn.Embedding(schedule.num_timesteps, hidden)
            self.inp = nn.Linear(dim, hidden)
            self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

        def forward(self, x_t, t):
            return self.out(self.inp(x_t) + self.emb(t))


    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = torch.randn(256, 1) * torch.linspace(-1.5, 1.5, 8) + 0.5  # points on a line: x0 is learnable
    held_x = data[:128]
    held_t = torch.randint(0, schedule.num_timesteps, (128,))
    held_noise = torch.randn(128, 8)

    def held_out_loss():
        with torch.no_grad():
            return diffusion_loss(net, schedule, held_x, held_t, held_noise)[0].item()

    before = held_out_loss()
    for step in range(20):
        x0 = data[torch.randint(0, 256, (64,))]
        t = torch.randint(0, schedule.num_timesteps, (64,))
        noise = torch.randn_like(x0)
        # by hand: noise x0 to t, regress the v target
        manual = (net(schedule.q_sample(x0, t, noise), t) - schedule.get_v(x0, noise, t)).square().mean()
        loss, per_sample = diffusion_loss(net, schedule, x0, t, noise, loss_weighting="min_snr")
        plain, _ = diffusion_loss(net, schedule, x0, t, noise)
        assert torch.allclose(plain, manual, rtol=1e-6, atol=0), (plain.item(), manual.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"))
    print(f"before={before:.6f} after={after:.6f} leaked={leaked}")
    """
)


def test_plain_pytorch_training_without_lightning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRAINING_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=", 1) for part in line.split(" "))
    assert fields["leaked"] == "[]", line
    before, after = float(fields["before"]), float(fields["after"])
    assert after < 0.85 * before, line
