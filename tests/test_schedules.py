"""Beta schedules, zero-terminal-SNR rescaling, the CompVis tables and the SNR helpers.

Parity with diffusers' schedulers lives in test_schedules_diffusers.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.schedules import (
    TABLE_NAMES,
    betas_for_alpha_bar,
    log_snr,
    make_beta_schedule,
    rescale_zero_terminal_snr,
    schedule_tables,
    snr,
)
from tests import compvis_reference as compvis

SD = compvis.SD_LINEAR


# --- the same schedules from their definitions in plain numpy (independent arithmetic) -------------------------------
def numpy_schedule(schedule, n, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    if schedule == "linear":
        return np.linspace(np.sqrt(linear_start), np.sqrt(linear_end), n) ** 2
    if schedule in ("cosine", "squaredcos_cap_v2"):
        s = cosine_s if schedule == "cosine" else 0.008
        k = np.arange(n + 1) / n
        abar = np.cos((k + s) / (1 + s) * np.pi / 2) ** 2
        return np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n)
    return np.sqrt(np.linspace(linear_start, linear_end, n))


CASES = [
    ("linear", 1000, {}),
    ("linear", 1000, SD),
    ("linear", 7, {"linear_start": 0.0, "linear_end": 0.5}),
    ("cosine", 1000, {}),
    ("cosine", 50, {"cosine_s": 0.0}),
    ("cosine", 3, {"cosine_s": 0.1}),
    ("squaredcos_cap_v2", 1000, {}),
    ("squaredcos_cap_v2", 1, {}),
    ("sqrt_linear", 1000, {}),
    ("sqrt_linear", 1, {"linear_start": 0.3}),
    ("sqrt", 1000, {}),
    ("sqrt", 10, {"linear_start": 0.0, "linear_end": 0.81}),
]


@pytest.mark.parametrize(("schedule", "n", "kwargs"), CASES)
def test_make_beta_schedule_equals_compvis(schedule, n, kwargs):
    betas = make_beta_schedule(schedule, n, **kwargs)
    assert isinstance(betas, np.ndarray)
    assert betas.dtype == np.float64
    assert betas.shape == (n,)
    np.testing.assert_array_equal(betas, compvis.make_beta_schedule(schedule, n, **kwargs))
    np.testing.assert_allclose(betas, numpy_schedule(schedule, n, **kwargs), rtol=1e-11, atol=1e-16)


def test_golden_values():
    sd = make_beta_schedule("linear", 1000, **SD)
    assert sd[0] == pytest.approx(0.00085, abs=1e-18)
    assert sd[-1] == pytest.approx(0.012, abs=1e-17)
    assert sd[1] == pytest.approx((math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2, rel=1e-14)
    cos = make_beta_schedule("cosine", 1000)
    assert cos[-1] == 0.999  # the last beta hits the clip
    assert cos[0] == pytest.approx(
        1 - math.cos((0.001 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel=1e-12
    )
    assert make_beta_schedule("sqrt", 2, linear_start=0.04, linear_end=0.09).tolist() == pytest.approx([0.2, 0.3])


def test_cosine_with_default_s_equals_squaredcos_cap_v2():
    diff = np.abs(make_beta_schedule("cosine", 1000) - make_beta_schedule("squaredcos_cap_v2", 1000)).max()
    assert diff < 1e-15


def test_squaredcos_ignores_linear_and_cosine_arguments():
    np.testing.assert_array_equal(
        make_beta_schedule("squaredcos_cap_v2", 100, linear_start=0.3, linear_end=0.5, cosine_s=0.5),
        make_beta_schedule("squaredcos_cap_v2", 100),
    )


@pytest.mark.parametrize(("schedule", "kwargs"), [("linear", SD), ("cosine", {}), ("sqrt_linear", {})])
def test_rescale_zero_terminal_snr_equals_the_paper_algorithm(schedule, kwargs):
    betas = make_beta_schedule(schedule, 1000, **kwargs)
    ours = rescale_zero_terminal_snr(betas)
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    np.testing.assert_allclose(ours, compvis.rescale_zero_terminal_snr(betas), rtol=0, atol=1e-14)


def test_rescale_zero_terminal_snr_properties():
    betas = make_beta_schedule("cosine", 100)
    out = rescale_zero_terminal_snr(betas)
    abar, abar_new = np.cumprod(1 - betas), np.cumprod(1 - out)
    assert out[-1] == 1.0
    assert abar_new[-1] == 0.0
    assert abar_new[0] == pytest.approx(abar[0], rel=1e-15)
    # √ā is mapped affinely: s' = (s − s_T)·s_0/(s_0 − s_T)
    s, s_new = np.sqrt(abar), np.sqrt(abar_new)
    np.testing.assert_allclose(s_new, (s - s[-1]) * s[0] / (s[0] - s[-1]), rtol=1e-12, atol=1e-15)
    # idempotent: a schedule that already ends at ā = 0 is unchanged
    np.testing.assert_allclose(rescale_zero_terminal_snr(out), out, rtol=0, atol=1e-15)
    # accepts a torch tensor and lists
    np.testing.assert_array_equal(rescale_zero_terminal_snr(torch.from_numpy(betas)), out)
    np.testing.assert_array_equal(rescale_zero_terminal_snr(betas.tolist()), out)


# --- schedule_tables: the CompVis register_schedule formulas -----------------------------------------------------
@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
@pytest.mark.parametrize(("schedule", "kwargs"), [("linear", SD), ("cosine", {}), ("sqrt_linear", {})])
def test_schedule_tables_equal_compvis(schedule, kwargs, v_posterior):
    betas = make_beta_schedule(schedule, 1000, **kwargs)
    tables = schedule_tables(betas, v_posterior=v_posterior)
    ref = compvis.register_schedule_tables(betas, v_posterior)
    assert tuple(tables) == TABLE_NAMES == compvis.TABLE_NAMES
    for name in TABLE_NAMES:
        assert tables[name].dtype == np.float64, name
        assert tables[name].shape == (1000,), name
        np.testing.assert_array_equal(tables[name], ref[name], err_msg=name)
    assert tables["betas"] is not betas  # a copy


def test_schedule_tables_zero_terminal_snr_finite():
    betas = rescale_zero_terminal_snr(make_beta_schedule("linear", 1000, **SD))
    tables = schedule_tables(betas)
    ref = compvis.register_schedule_tables(betas)
    for name, table in tables.items():
        assert np.isfinite(table).all(), name
        np.testing.assert_array_equal(table[:-1], ref[name][:-1], err_msg=name)  # unchanged before the last step
    assert tables["alphas_cumprod"][-1] == 0.0
    assert tables["snr"][-1] == 0.0
    assert tables["sqrt_recip_alphas_cumprod"][-1] == 4096.0  # ā* = 2⁻²⁴
    assert tables["sqrt_recipm1_alphas_cumprod"][-1] == pytest.approx(math.sqrt(2**24 - 1), rel=1e-15)
    assert tables["posterior_variance"][-1] == pytest.approx(1 - tables["alphas_cumprod"][-2], rel=1e-12)
    assert tables["posterior_mean_coef2"][-1] == 0.0
    # float32 buffers stay finite too
    assert all(np.isfinite(t.astype(np.float32)).all() for t in tables.values())


def test_schedule_tables_zero_terminal_snr_tiny_alpha_bar_keeps_recip_monotone():
    betas = rescale_zero_terminal_snr(make_beta_schedule("sqrt_linear", 100, linear_start=0.1, linear_end=0.3))
    tables = schedule_tables(betas)
    ac = tables["alphas_cumprod"]
    assert 1e-20 < ac[-2] < 2.0**-24
    assert tables["sqrt_recip_alphas_cumprod"][-1] == pytest.approx(1 / math.sqrt(ac[-2]), rel=1e-15)
    assert np.all(np.diff(tables["sqrt_recip_alphas_cumprod"]) >= 0)


def test_schedule_tables_leading_zero_beta_limits():
    betas = make_beta_schedule("sqrt_linear", 10, linear_start=0.0, linear_end=0.1)
    tables = schedule_tables(betas)
    assert all(np.isfinite(t).all() for t in tables.values())
    assert tables["posterior_variance"][0] == 0.0
    assert tables["posterior_mean_coef1"][0] == 1.0
    assert tables["posterior_mean_coef2"][0] == 0.0
    assert tables["log_one_minus_alphas_cumprod"][0] == pytest.approx(math.log(1e-20))
    assert tables["snr"][0] == pytest.approx(1e20)
    ref = compvis.register_schedule_tables(betas)
    for name in TABLE_NAMES:
        np.testing.assert_array_equal(tables[name][1:], ref[name][1:], err_msg=name)


# --- snr / log_snr ---------------------------------------------------------------------------------------------------
def test_snr_numpy_and_torch():
    ac = np.cumprod(1 - rescale_zero_terminal_snr(make_beta_schedule("linear", 1000, **SD)))
    s = snr(ac)
    np.testing.assert_array_equal(s[:-1], ac[:-1] / (1 - ac[:-1]))
    assert s[-1] == 0.0
    ls = log_snr(ac)
    np.testing.assert_allclose(ls[:-1], np.log(ac[:-1] / (1 - ac[:-1])), rtol=1e-12)
    assert ls[-1] == pytest.approx(math.log(1e-20))
    assert np.isfinite(ls).all()

    t32 = torch.from_numpy(ac).float()
    s32, ls32 = snr(t32), log_snr(t32)
    assert s32.dtype == torch.float32 and ls32.dtype == torch.float32
    ac32 = t32.double().numpy()  # the float32 ā, exactly
    np.testing.assert_allclose(s32[:-1].numpy(), ac32[:-1] / (1 - ac32[:-1]), rtol=3e-7)
    np.testing.assert_allclose(ls32[:-1].numpy(), np.log(ac32[:-1] / (1 - ac32[:-1])), rtol=0, atol=2e-5)
    assert torch.isfinite(ls32).all()
    assert snr(torch.from_numpy(ac)).dtype == torch.float64
    assert snr(t32.bfloat16()).dtype == torch.float32  # computed in at least float32
    assert torch.isfinite(log_snr(torch.tensor([1.0, 0.0], dtype=torch.float16))).all()


def test_snr_rejects_integer_tensor():
    with pytest.raises(TypeError, match="floating tensor"):
        snr(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="floating tensor"):
        log_snr(torch.tensor([1, 0]))


# --- hypothesis properties -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(["linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt"]),
    n=st.integers(1, 2000),
    start=st.floats(0.0, 0.99, allow_subnormal=False),
    end=st.floats(0.0, 0.99, allow_subnormal=False),
    s=st.floats(0.0, 10.0, allow_subnormal=False),
)
def test_property_betas_in_range_and_alpha_bar_decreasing(schedule, n, start, end, s):
    betas = make_beta_schedule(schedule, n, linear_start=start, linear_end=end, cosine_s=s)
    assert betas.shape == (n,) and betas.dtype == np.float64
    assert np.all((betas >= 0) & (betas < 1))
    abar = np.cumprod(1 - betas)
    steps = np.diff(abar)
    # 1 − β rounds to 1 below ~1e-16; ā may underflow into the subnormals, where it stops changing
    resolvable = (betas[1:] > 1e-15) & (abar[:-1] > 1e-300)
    assert np.all(steps[resolvable] < 0)
    assert np.all(steps <= 0)
    tables = schedule_tables(betas)
    assert all(np.isfinite(t).all() for t in tables.values())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 1500),
    start=st.floats(1e-5, 0.05, allow_subnormal=False),
    end=st.floats(1e-3, 0.5, allow_subnormal=False),
)
def test_property_rescaled_tables_finite(n, start, end):
    betas = rescale_zero_terminal_snr(make_beta_schedule("linear", n, linear_start=start, linear_end=end))
    assert np.all((betas[:-1] >= 0) & (betas[:-1] < 1)) and betas[-1] == 1.0
    tables = schedule_tables(betas)
    assert all(np.isfinite(t).all() for t in tables.values())
    assert np.isfinite(log_snr(tables["alphas_cumprod"])).all()


# --- betas_for_alpha_bar ---------------------------------------------------------------------------------------------
def test_betas_for_alpha_bar_formula():
    f = lambda t: math.exp(-3.0 * t)  # noqa: E731
    out = betas_for_alpha_bar(10, f)
    expected = [min(1 - f((i + 1) / 10) / f(i / 10), 0.999) for i in range(10)]
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, 1 - math.exp(-0.3), rtol=1e-14)
    capped = betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=0.5)
    np.testing.assert_allclose(capped, [0.25, 1 / 3, 0.5, 0.5])
    assert betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=1.0)[-1] == 1.0  # ā(1) = 0: β_T = 1 allowed


# --- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (("cosin", 10), {}, ValueError, r"schedule='cosin' is not supported; expected one of 'linear', 'cosine'"),
        (("linear", 0), {}, ValueError, r"n_timestep=0 is out of range; expected an integer >= 1"),
        (("linear", -5), {}, ValueError, r"n_timestep=-5"),
        (("linear", 10.0), {}, TypeError, r"n_timestep must be an integer, got 10.0"),
        (("linear", True), {}, TypeError, r"n_timestep must be an integer"),
        (("linear", 10), {"linear_start": -1e-4}, ValueError, r"linear_start=-0.0001 is out of range"),
        (("sqrt_linear", 10), {"linear_end": -0.1}, ValueError, r"linear_end=-0.1 is out of range"),
        (("cosine", 10), {"cosine_s": -0.01}, ValueError, r"cosine_s=-0.01 is out of range"),
        (("linear", 10), {"linear_end": float("nan")}, ValueError, r"linear_end=nan must be finite"),
        (("linear", 10), {"linear_end": "0.1"}, TypeError, r"linear_end must be a real number"),
        (("linear", 10), {"linear_end": 1.0}, ValueError, r"beta\[9\]=1\.0.* lies outside \[0, 1\)"),
        (("sqrt_linear", 10), {"linear_end": 2.0}, ValueError, r"make_beta_schedule\('sqrt_linear'.*outside \[0, 1\)"),
        (("sqrt", 10), {"linear_end": 1.5}, ValueError, r"lies outside \[0, 1\)"),
    ],
)
def test_make_beta_schedule_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_beta_schedule(*args, **kwargs)


def test_betas_for_alpha_bar_errors():
    with pytest.raises(ValueError, match=r"num_diffusion_timesteps=0 is out of range"):
        betas_for_alpha_bar(0, lambda t: 1 - t)
    with pytest.raises(TypeError, match=r"alpha_bar must be a callable"):
        betas_for_alpha_bar(10, 0.5)
    with pytest.raises(ValueError, match=r"max_beta=0 is out of range; expected a number in \(0, 1\]"):
        betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.0)
    with pytest.raises(ValueError, match=r"max_beta=1.5 is out of range"):
        betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=1.5)
    with pytest.raises(ValueError, match=r"alpha_bar\(0.0\) = 0.0; alpha_bar must be positive"):
        betas_for_alpha_bar(10, lambda t: 0.0)
    with pytest.raises(ValueError, match=r"beta\[0\]=-.* lies outside"):  # an increasing ā gives negative betas
        betas_for_alpha_bar(10, lambda t: 1 + t)


@pytest.mark.parametrize(
    ("betas", "match"),
    [
        (np.zeros((2, 3)), r"betas must be a 1-D array of at least 1 per-timestep betas, got shape \(2, 3\)"),
        (np.array([]), r"got shape \(0,\)"),
        (np.array([0.1, np.nan, 0.2]), r"betas\[1\]=nan is not finite"),
        (np.array([0.1, -0.2, 0.2]), r"betas\[1\]=-0.2 lies outside \[0, 1\) \(only the last beta may be 1"),
        (np.array([0.1, 1.0, 0.2]), r"betas\[1\]=1.0 lies outside"),
        (np.array([0.1, 0.2, 1.5]), r"betas\[2\]=1.5 lies outside"),
    ],
)
def test_schedule_tables_rejects_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        schedule_tables(betas)


def test_schedule_tables_rejects_bad_v_posterior():
    with pytest.raises(ValueError, match=r"v_posterior=1.5 is out of range; expected a number in \[0, 1\]"):
        schedule_tables(np.full(3, 0.1), v_posterior=1.5)


def test_rescale_zero_terminal_snr_errors():
    with pytest.raises(ValueError, match=r"needs at least 2 betas, got 1"):
        rescale_zero_terminal_snr(np.array([0.1]))
    with pytest.raises(ValueError, match=r"the last beta is 0.0; rescale_zero_terminal_snr needs a positive last beta"):
        rescale_zero_terminal_snr(np.array([0.1, 0.2, 0.0]))
    with pytest.raises(ValueError, match=r"betas\[1\]=-0.1 lies outside"):
        rescale_zero_terminal_snr(np.array([0.1, -0.1, 0.2]))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt"])
def test_schedule_ignores_a_default_device_context(schedule):
    # trainer.init_module() on a GPU, or meta-device init, sets a default device; the float64 numpy
    # schedule must be computed on the CPU regardless.
    expected = make_beta_schedule(schedule, 50)
    with torch.device("meta"):
        inside = make_beta_schedule(schedule, 50)
    np.testing.assert_array_equal(inside, expected)
