"""DDIM steps, sigmas, the update and the sampling loop: CompVis parity, properties, errors.

Parity with diffusers' DDIMScheduler lives in test_ddim_diffusers.py.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.ddim import ddim_sample, ddim_step, make_ddim_sampling_parameters, make_ddim_timesteps
from lightning_ldm.schedules import make_beta_schedule, rescale_zero_terminal_snr
from tests import compvis_reference as compvis

T = 1000
SD_BETAS = make_beta_schedule("linear", T, **compvis.SD_LINEAR)
AC = np.cumprod(1 - SD_BETAS)
UNIFORM_FAILS_T1000 = {3, 9, 27, 36, 37, *range(101, 112), *range(251, 334), *range(501, 1001)}


# --- make_ddim_timesteps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["uniform", "quad"])
@pytest.mark.parametrize(("n", "total"), [(10, 100), (50, 1000), (30, 1000), (1, 1000), (250, 1000), (7, 16), (4, 30)])
def test_compvis_methods_equal_compvis(method, n, total):
    steps = make_ddim_timesteps(method, n, total, verbose=False)
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(steps, compvis.make_ddim_timesteps(method, n, total))


def test_compvis_quirks_kept():
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 10, 100, verbose=False), np.arange(1, 100, 10))
    assert len(make_ddim_timesteps("uniform", 30, 1000, verbose=False)) == 31  # ceil(1000 / 33)
    quad = make_ddim_timesteps("quad", 50, 1000, verbose=False)
    assert len(quad) == 50 and len(np.unique(quad)) == 49
    assert quad[-1] == 801
    assert make_ddim_timesteps("quad", 7, 15, verbose=False)[-1] == 12  # float rounding: 0.8·T, not 0.8·T + 1


def test_uniform_reaching_t_is_refused_exactly_where_compvis_fails():
    failing = set()
    for n in range(1, T + 1):
        try:
            steps = make_ddim_timesteps("uniform", n, T, verbose=False)
        except ValueError:
            failing.add(n)
            assert compvis.make_ddim_timesteps("uniform", n, T)[-1] == T  # CompVis' later IndexError
        else:
            assert steps[-1] < T
    assert failing == UNIFORM_FAILS_T1000


def test_uniform_reaching_t_message_names_working_methods():
    with pytest.raises(ValueError, match=r"last step at 1000, outside the valid timesteps \[0, 999\]") as info:
        make_ddim_timesteps("uniform", 3, T)
    assert "Methods that work for these arguments: 'quad', 'linspace', 'trailing'" in str(info.value)
    with pytest.raises(ValueError, match=r"Methods that work for these arguments: 'linspace', 'trailing'$"):
        make_ddim_timesteps("quad", 3, 4)  # tiny T: quad reaches T too
    with pytest.raises(ValueError, match=r"Methods that work for these arguments: 'uniform', 'linspace', 'trailing'"):
        make_ddim_timesteps("quad", 2, 4)


def test_trailing_reaches_last_timestep_and_linspace_the_first():
    assert make_ddim_timesteps("trailing", 50, T, verbose=False)[-1] == T - 1
    np.testing.assert_array_equal(make_ddim_timesteps("trailing", 10, 100, verbose=False), np.arange(9, 100, 10))
    np.testing.assert_array_equal(make_ddim_timesteps("linspace", 5, T, verbose=False), [0, 250, 500, 749, 999])


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["uniform", "quad", "linspace", "trailing"]),
    total=st.integers(1, 5000),
    frac=st.floats(0.0, 1.0, allow_subnormal=False),
)
def test_property_steps_ascending_in_range(method, total, frac):
    n = max(1, min(total, round(frac * total)))
    try:
        steps = make_ddim_timesteps(method, n, total, verbose=False)
    except ValueError as err:
        assert method in ("uniform", "quad") and "outside the valid timesteps" in str(err)
        assert compvis.make_ddim_timesteps(method, n, total)[-1] >= total
        return
    assert steps.dtype == np.int64
    assert np.all(np.diff(steps) >= 0)
    assert steps[0] >= 0 and steps[-1] <= total - 1
    if method in ("linspace", "trailing"):
        assert len(steps) == n and len(np.unique(steps)) == n
    if method == "uniform":
        assert np.all(np.diff(steps) > 0)
    if method == "trailing":
        assert steps[-1] == total - 1


def test_verbose_logs_instead_of_printing(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="lightning_ldm"):
        make_ddim_timesteps("uniform", 10, 100)
        make_ddim_sampling_parameters(AC, np.array([1, 500]), 0.5)
    assert "Selected timesteps for ddim sampler: [ 1 11 21 31 41 51 61 71 81 91]" in caplog.text
    assert "sigma_t schedule" in caplog.text
    assert all(r.name == "lightning_ldm.ddim" for r in caplog.records)
    assert capsys.readouterr().out == ""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_ldm"):
        make_ddim_timesteps("uniform", 10, 100, verbose=False)
        make_ddim_sampling_parameters(AC, np.array([1, 500]), 0.5, verbose=False)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (
            ("ddpm", 10, 100),
            ValueError,
            r"ddim_discr_method='ddpm' is not supported; expected one of 'uniform', "
            r"'quad', 'linspace', 'trailing'",
        ),
        (("uniform", 0, 100), ValueError, r"num_ddim_timesteps=0 is out of range; expected an integer in \[1, 100\]"),
        (
            ("linspace", 101, 100),
            ValueError,
            r"num_ddim_timesteps=101 is out of range; expected an integer in \[1, 100\]",
        ),
        (("uniform", 10, 0), ValueError, r"num_ddpm_timesteps=0 is out of range"),
        (("uniform", 10.0, 100), TypeError, r"num_ddim_timesteps must be an integer, got 10.0"),
        (("uniform", 10, "100"), TypeError, r"num_ddpm_timesteps must be an integer"),
    ],
)
def test_make_ddim_timesteps_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        make_ddim_timesteps(*args, verbose=False)


# --- make_ddim_sampling_parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", ["uniform", "quad", "linspace", "trailing"])
def test_sampling_parameters_equal_compvis(method, eta):
    steps = make_ddim_timesteps(method, 50, T, verbose=False)
    ours = make_ddim_sampling_parameters(AC, steps, eta, verbose=False)
    ref = compvis.make_ddim_sampling_parameters(AC, steps, eta)
    for a, b in zip(ours, ref, strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    assert ours[2][0] == AC[0]  # the first "previous" ā is ā[0], not 1


def test_sampling_parameters_sigma_formula():
    steps = np.array([1, 21, 41])
    sigmas, alphas, prev = make_ddim_sampling_parameters(AC, steps, 0.7, verbose=False)
    a, ap = AC[41], AC[21]
    assert sigmas[2] == pytest.approx(0.7 * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), rel=1e-14)
    assert prev.tolist() == [AC[0], AC[1], AC[21]]
    assert alphas.tolist() == [AC[1], AC[21], AC[41]]


def test_sampling_parameters_torch_in_torch_out():
    steps = make_ddim_timesteps("uniform", 50, T, verbose=False)
    ref = make_ddim_sampling_parameters(AC, steps, 1.0, verbose=False)
    for dtype in (torch.float32, torch.float64):
        out = make_ddim_sampling_parameters(torch.tensor(AC, dtype=dtype), torch.from_numpy(steps), 1.0, verbose=False)
        ac_in = torch.tensor(AC, dtype=dtype).double().numpy()
        ref_in = compvis.make_ddim_sampling_parameters(ac_in, steps, 1.0)  # float64 maths on the given ā
        for a, b in zip(out, ref_in, strict=True):
            assert isinstance(a, torch.Tensor) and a.dtype == dtype and a.device.type == "cpu"
            np.testing.assert_array_equal(a.numpy(), b.astype(a.numpy().dtype))
    out32 = make_ddim_sampling_parameters(AC.astype(np.float32), steps, 1.0, verbose=False)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in out32)
    out_list = make_ddim_sampling_parameters(AC.tolist(), steps.tolist(), 1.0, verbose=False)
    for a, b in zip(out_list, ref, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["uniform", "quad", "linspace", "trailing"]),
    n=st.integers(1, 1000),
    eta=st.floats(0.0, 1.0, allow_subnormal=False),
    zero_snr=st.booleans(),
)
def test_property_sigmas_finite_and_direction_real(method, n, eta, zero_snr):
    ac = np.cumprod(1 - rescale_zero_terminal_snr(SD_BETAS)) if zero_snr else AC
    try:
        steps = make_ddim_timesteps(method, n, T, verbose=False)
    except ValueError:
        assert method in ("uniform", "quad")
        return
    sigmas, _, alphas_prev = make_ddim_sampling_parameters(ac, steps, eta, verbose=False)
    assert np.isfinite(sigmas).all() and np.all(sigmas >= 0)
    assert np.all(sigmas**2 <= (1 - alphas_prev) * (1 + 1e-12))  # eta <= 1 keeps √(1 − a_prev − σ²) real


def test_sigma_is_zero_for_a_step_without_noise():
    betas = make_beta_schedule("sqrt_linear", 10, linear_start=0.0, linear_end=0.1)  # ā[0] = 1
    sigmas, _, _ = make_ddim_sampling_parameters(np.cumprod(1 - betas), np.array([0, 5, 9]), 1.0, verbose=False)
    assert sigmas[0] == 0.0 and np.isfinite(sigmas).all()


def test_sampling_parameters_errors():
    steps = np.array([1, 11, 21])
    with pytest.raises(ValueError, match=r"eta=-0.1 is out of range; expected a number in \[0, inf\]"):
        make_ddim_sampling_parameters(AC, steps, -0.1)
    with pytest.raises(TypeError, match=r"eta must be a real number"):
        make_ddim_sampling_parameters(AC, steps, "0.5")
    with pytest.raises(ValueError, match=r"alphacums must be a non-empty 1-D array .*got shape \(2, 500\)"):
        make_ddim_sampling_parameters(AC.reshape(2, 500), steps, 0.0)
    with pytest.raises(ValueError, match=r"alphacums\[3\]=1.5 is not a cumulative alpha; expected values in \[0, 1\]"):
        make_ddim_sampling_parameters(np.array([1.0, 0.9, 0.8, 1.5]), np.array([1]), 0.0)
    with pytest.raises(TypeError, match=r"alphacums must be a floating tensor"):
        make_ddim_sampling_parameters(torch.ones(10, dtype=torch.long), np.array([1]), 0.0)
    with pytest.raises(ValueError, match=r"ddim_timesteps holds timestep 1000, outside the valid range \[0, 999\]"):
        make_ddim_sampling_parameters(AC, np.array([1, 500, 1000]), 0.0)
    with pytest.raises(ValueError, match=r"ddim_timesteps holds timestep -1, outside"):
        make_ddim_sampling_parameters(AC, torch.tensor([-1, 500]), 0.0)
    with pytest.raises(ValueError, match=r"ddim_timesteps must be a non-empty 1-D array"):
        make_ddim_sampling_parameters(AC, np.array([[1, 2]]), 0.0)
    with pytest.raises(TypeError, match=r"ddim_timesteps must hold integer timesteps, got dtype float64"):
        make_ddim_sampling_parameters(AC, np.array([1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match=r"sigma of DDIM step 2 \(timestep 11\) is undefined.*must be ascending"):
        make_ddim_sampling_parameters(AC, np.array([1, 21, 11]), 1.0)


# --- ddim_step -------------------------------------------------------------------------------------------------------
def numpy_step(x, o, a, ap, sigma, param, noise):
    x, o = x.astype(np.float64), o.astype(np.float64)
    if param == "eps":
        x0, e = (x - math.sqrt(1 - a) * o) / math.sqrt(a), o
    elif param == "x0":
        x0, e = o, (x - math.sqrt(a) * o) / math.sqrt(1 - a)
    else:
        x0, e = math.sqrt(a) * x - math.sqrt(1 - a) * o, math.sqrt(a) * o + math.sqrt(1 - a) * x
    return math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * e + sigma * noise, x0


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("sigma", [0.0, 0.05])
def test_ddim_step_formula(param, sigma):
    g = torch.Generator().manual_seed(0)
    x, o, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a, ap = float(AC[500]), float(AC[480])
    x_prev, x0 = ddim_step(x, o, a, ap, sigma, parameterization=param, noise=z)
    ref_prev, ref_x0 = numpy_step(x.numpy(), o.numpy(), a, ap, sigma, param, z.numpy().astype(np.float64))
    assert x_prev.dtype == torch.float32 and x0.dtype == torch.float32
    np.testing.assert_allclose(x_prev.numpy(), ref_prev, rtol=0, atol=2e-6)
    np.testing.assert_allclose(x0.numpy(), ref_x0, rtol=0, atol=2e-6)


def test_ddim_step_tensor_coefficients_and_dtypes():
    g = torch.Generator().manual_seed(1)
    x, o = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    a = torch.tensor([AC[500], AC[100]], dtype=torch.float64).view(2, 1, 1)
    ap = torch.tensor([AC[480], AC[80]], dtype=torch.float64).view(2, 1, 1)
    out, _ = ddim_step(x, o, a, ap, 0.0, parameterization="v")
    for i, (ai, api) in enumerate([(AC[500], AC[480]), (AC[100], AC[80])]):
        ref, _ = ddim_step(x[i : i + 1], o[i : i + 1], float(ai), float(api), 0.0, parameterization="v")
        torch.testing.assert_close(out[i : i + 1], ref, rtol=0, atol=1e-6)
    out_bf16, x0_bf16 = ddim_step(x.bfloat16(), o.bfloat16(), float(AC[500]), float(AC[480]), 0.0)
    assert out_bf16.dtype == torch.bfloat16 and x0_bf16.dtype == torch.bfloat16
    _, clipped = ddim_step(x, o * 50, float(AC[500]), float(AC[480]), 0.0, clip_x0=1.0)
    assert clipped.abs().max() <= 1.0
    # without noise, a nonzero sigma draws it (torch.randn_like)
    torch.manual_seed(3)
    drawn, _ = ddim_step(x, o, float(AC[500]), float(AC[480]), 0.1)
    torch.manual_seed(3)
    z = torch.randn_like(x)
    given_noise, _ = ddim_step(x, o, float(AC[500]), float(AC[480]), 0.1, noise=z)
    torch.testing.assert_close(drawn, given_noise, rtol=0, atol=0)


def test_ddim_step_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"parameterization='score' is not supported; expected one of 'eps', 'x0', 'v'"
    ):
        ddim_step(x, x, 0.5, 0.6, 0.0, parameterization="score")
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4\), expected the shape of x_t \(2, 3\)"):
        ddim_step(x, torch.zeros(2, 4), 0.5, 0.6, 0.0)
    with pytest.raises(ValueError, match=r"noise has shape \(3,\)"):
        ddim_step(x, x, 0.5, 0.6, 0.1, noise=torch.zeros(3))
    with pytest.raises(ValueError, match=r"alpha=1.5 is out of range"):
        ddim_step(x, x, 1.5, 0.6, 0.0)
    with pytest.raises(ValueError, match=r"sigma=-0.1 is out of range"):
        ddim_step(x, x, 0.5, 0.6, -0.1)
    with pytest.raises(ValueError, match=r"clip_x0=0 is out of range; expected a number in \(0, inf\]"):
        ddim_step(x, x, 0.5, 0.6, 0.0, clip_x0=0.0)
    with pytest.raises(ValueError, match=r"parameterization='eps' cannot recover x0 in ddim_step, where ā = 0.0"):
        ddim_step(x, x, 0.0, 0.6, 0.0)
    with pytest.raises(ValueError, match=r"parameterization='x0' cannot recover ε in ddim_step, where ā = 1.0"):
        ddim_step(x, x, 1.0, 1.0, 0.0, parameterization="x0")
    with pytest.raises(ValueError, match=r"sigma=0.9 is too large in ddim_step: sigma² exceeds 1 - ā_prev = 0.4"):
        ddim_step(x, x, 0.5, 0.6, 0.9)


# --- ddim_sample -----------------------------------------------------------------------------------------------------
def toy_model(x, t):
    """A deterministic nonlinear 'model' that uses t (as CompVis' sampler passes it)."""
    return torch.tanh(0.7 * x + (t.to(x.dtype) / 1000.0).view(-1, *([1] * (x.ndim - 1))))


def reference_loop(x_start, ac, n, method, eta, param, clip_x0=None, seed=None):
    """ddim_step driven by make_ddim_sampling_parameters, CompVis' DDIMSampler structure."""
    steps = make_ddim_timesteps(method, n, len(ac), verbose=False)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, steps, eta, verbose=False)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x, xs, x0s = x_start.float(), [x_start], [x_start]
    for i in reversed(range(len(steps))):
        t = torch.full((x.shape[0],), int(steps[i]), dtype=torch.long)
        noise = torch.randn(x.shape, generator=g) if sigmas[i] > 0 else None
        x, x0 = ddim_step(
            x,
            toy_model(x, t),
            float(alphas[i]),
            float(alphas_prev[i]),
            float(sigmas[i]),
            parameterization=param,
            noise=noise,
            clip_x0=clip_x0,
        )
        xs.append(x)
        x0s.append(x0)
    return x, xs, x0s


@pytest.mark.parametrize(
    ("method", "eta", "param", "clip"),
    [
        ("uniform", 0.0, "eps", None),
        ("linspace", 0.0, "v", None),
        ("quad", 0.5, "eps", None),
        ("linspace", 1.0, "x0", None),
        ("trailing", 0.3, "v", 1.0),
        ("uniform", 0.0, "eps", 0.5),
    ],
)
def test_ddim_sample_equals_loop_of_ddim_step(method, eta, param, clip):
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample(
        toy_model,
        x_T,
        AC,
        num_steps=30,
        method=method,
        eta=eta,
        parameterization=param,
        generator=torch.Generator().manual_seed(7),
        clip_x0=clip,
    )
    ref, _, _ = reference_loop(x_T, AC, 30, method, eta, param, clip_x0=clip, seed=7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_ddim_sample_intermediates():
    x_T = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out, inter = ddim_sample(
        toy_model,
        x_T,
        AC,
        num_steps=10,
        method="trailing",
        eta=0.5,
        parameterization="v",
        generator=torch.Generator().manual_seed(3),
        return_intermediates=True,
    )
    _, xs, x0s = reference_loop(x_T, AC, 10, "trailing", 0.5, "v", seed=3)
    assert set(inter) == {"x_inter", "pred_x0"}
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 11
    assert inter["x_inter"][0] is x_T and inter["pred_x0"][0] is x_T
    torch.testing.assert_close(inter["x_inter"][-1], out, rtol=0, atol=0)
    for a, b in zip(inter["x_inter"] + inter["pred_x0"], xs + x0s, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    plain = ddim_sample(
        toy_model,
        x_T,
        AC,
        num_steps=10,
        method="trailing",
        eta=0.5,
        parameterization="v",
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(plain, out, rtol=0, atol=2e-5)


def test_ddim_sample_generator_reproducible_and_input_untouched():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    keep = x_T.clone()
    a = ddim_sample(toy_model, x_T, AC, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(toy_model, x_T, AC, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(toy_model, x_T, AC, num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    torch.testing.assert_close(x_T, keep, rtol=0, atol=0)


def test_ddim_sample_low_precision_io():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    dtypes = []

    def bf16_model(x, t):
        dtypes.append(x.dtype)
        return toy_model(x.float(), t).bfloat16()

    out32 = ddim_sample(bf16_model, x_T, AC, num_steps=10)
    assert out32.dtype == torch.float32 and dtypes[0] == torch.float32
    out16 = ddim_sample(bf16_model, x_T.bfloat16(), AC, num_steps=10)
    assert out16.dtype == torch.bfloat16 and dtypes[-1] == torch.bfloat16
    out64 = ddim_sample(lambda x, t: toy_model(x, t).double(), x_T, torch.from_numpy(AC), num_steps=10)
    assert out64.dtype == torch.float32  # the update stays float32
    assert (out16.float() - out32).abs().max() < 0.1


def test_ddim_sample_runs_without_grad():
    w = torch.nn.Parameter(torch.tensor(0.5))
    out = ddim_sample(lambda x, t: w * x, torch.randn(1, 2), AC, num_steps=5)
    assert not out.requires_grad


def test_zero_terminal_snr_trailing_v():
    ac = np.cumprod(1 - rescale_zero_terminal_snr(SD_BETAS))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(toy_model, x_T, ac, num_steps=20, method="trailing", parameterization="v")
    assert torch.isfinite(out).all()
    ref, _, _ = reference_loop(x_T, ac, 20, "trailing", 0.0, "v")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"parameterization='eps' cannot recover x0 at DDIM step 19 \(timestep 999\)"):
        ddim_sample(toy_model, x_T, ac, num_steps=20, method="trailing", parameterization="eps")


def test_ddim_sample_errors():
    x_T = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"model_fn must be callable"):
        ddim_sample(None, x_T, AC)
    with pytest.raises(TypeError, match=r"x_T must be a floating tensor .*dtype torch.int64"):
        ddim_sample(toy_model, torch.zeros(2, 3, dtype=torch.long), AC)
    with pytest.raises(ValueError, match=r"x_T must have a batch dimension"):
        ddim_sample(toy_model, torch.tensor(0.0), AC)
    with pytest.raises(ValueError, match=r"^method='ddpm' is not supported"):  # named as ddim_sample's argument
        ddim_sample(toy_model, x_T, AC, method="ddpm")
    with pytest.raises(ValueError, match=r"num_steps=1001 is out of range; expected an integer in \[1, 1000\]"):
        ddim_sample(toy_model, x_T, AC, num_steps=1001)
    with pytest.raises(ValueError, match=r"^method='uniform' with num_steps=.* and T=1000 timesteps: .*step at 1000"):
        ddim_sample(toy_model, x_T, AC, num_steps=3)
    with pytest.raises(ValueError, match=r"eta=-1 is out of range"):
        ddim_sample(toy_model, x_T, AC, eta=-1.0)
    with pytest.raises(ValueError, match=r"parameterization='epsilon' is not supported"):
        ddim_sample(toy_model, x_T, AC, parameterization="epsilon")
    with pytest.raises(ValueError, match=r"alphas_cumprod must be a non-empty 1-D array"):
        ddim_sample(toy_model, x_T, AC[None])
    with pytest.raises(ValueError, match=r"clip_x0=-1 is out of range"):
        ddim_sample(toy_model, x_T, AC, clip_x0=-1.0)
    with pytest.raises(ValueError, match=r"sigma=.* is too large at DDIM step"):
        ddim_sample(toy_model, x_T, AC, eta=3.0)
    with pytest.raises(ValueError, match=r"model_fn returned shape \(2, 4\), expected the shape of x_t \(2, 3\)"):
        ddim_sample(lambda x, t: torch.zeros(2, 4), x_T, AC)
    with pytest.raises(TypeError, match=r"model_fn must return a tensor, got tuple"):
        ddim_sample(lambda x, t: (x,), x_T, AC)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddim_on_cuda_matches_cpu():
    ac_cuda = torch.from_numpy(AC).cuda()
    steps = make_ddim_timesteps("trailing", 20, T, verbose=False)
    params = make_ddim_sampling_parameters(ac_cuda.float(), torch.from_numpy(steps).cuda(), 0.5, verbose=False)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t):
        seen.append(t.device.type)
        return toy_model(x, t)

    cpu = ddim_sample(toy_model, x_T, AC, num_steps=20, method="trailing", parameterization="v")
    gpu = ddim_sample(model, x_T.cuda(), ac_cuda, num_steps=20, method="trailing", parameterization="v")
    assert gpu.device.type == "cuda" and set(seen) == {"cuda"}
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    g1, g2 = (torch.Generator(device="cuda").manual_seed(3) for _ in range(2))
    a = ddim_sample(toy_model, x_T.cuda(), ac_cuda, num_steps=10, eta=1.0, generator=g1)
    b = ddim_sample(toy_model, x_T.cuda(), ac_cuda, num_steps=10, eta=1.0, generator=g2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ddim_sample(
            lambda x, t: torch.nn.functional.linear(x, torch.eye(8, device="cuda")), x_T.cuda(), ac_cuda, num_steps=10
        )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
