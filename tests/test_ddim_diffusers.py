"""DDIM parity with diffusers' DDIMScheduler: timestep spacings, the sigma (variance) formula, the sampling loop.

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from lightning_ldm.ddim import ddim_sample, make_ddim_sampling_parameters, make_ddim_timesteps
from lightning_ldm.schedules import rescale_zero_terminal_snr
from tests.test_ddim import AC, SD_BETAS, T, toy_model

PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_loop(x_start, ac, n, spacing, offset, param):
    sched = DDIMScheduler(
        set_alpha_to_one=False,
        clip_sample=False,
        timestep_spacing=spacing,
        steps_offset=offset,
        prediction_type=PREDICTION[param],
    )
    sched.alphas_cumprod = torch.from_numpy(ac)  # our float64 ā, so only the sampler arithmetic is compared
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(n)
    x = x_start.clone()
    for t in sched.timesteps:
        out = toy_model(x, t.repeat(x.shape[0]))
        x = sched.step(out, int(t), x, eta=0.0).prev_sample
    return x.float(), np.asarray(sched.timesteps)


# --- make_ddim_timesteps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [1000, 100, 37, 1])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_linspace_trailing_equal_diffusers(spacing, total):
    sched = DDIMScheduler(num_train_timesteps=total, timestep_spacing=spacing)
    diffusers_extra = 0
    for n in range(1, total + 1):
        ours = make_ddim_timesteps(spacing, n, total, verbose=False)
        sched.set_timesteps(n)
        theirs = np.sort(sched.timesteps.numpy())
        if len(theirs) == n + 1:  # diffusers' float arange yields an extra step −1 for some (T, n)
            assert spacing == "trailing" and theirs[0] == -1
            theirs = theirs[1:]
            diffusers_extra += 1
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{spacing} n={n} T={total}")
    if spacing == "trailing" and total == 100:
        assert diffusers_extra > 0  # the case exists (T = 100, n = 29)


# --- make_ddim_sampling_parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize(("n", "spacing", "offset"), [(50, "leading", 1), (20, "trailing", 0), (8, "trailing", 0)])
def test_sigmas_match_diffusers_variance(n, spacing, offset, eta):
    method = "uniform" if spacing == "leading" else spacing
    steps = make_ddim_timesteps(method, n, T, verbose=False)
    sigmas, _, _ = make_ddim_sampling_parameters(AC, steps, eta, verbose=False)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    sched.set_timesteps(n)
    np.testing.assert_array_equal(np.sort(sched.timesteps.numpy()), steps)
    prev = steps - T // n  # diffusers' previous timestep
    var32 = np.array([float(sched._get_variance(int(t), int(p))) for t, p in zip(steps, prev, strict=True)])
    np.testing.assert_allclose(sigmas**2, eta**2 * var32, rtol=1e-3, atol=1e-7)  # their ā is float32
    sched.alphas_cumprod = torch.from_numpy(AC)  # same ā: only the formula differs
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    var64 = np.array([float(sched._get_variance(int(t), int(p))) for t, p in zip(steps, prev, strict=True)])
    np.testing.assert_allclose(sigmas**2, eta**2 * var64, rtol=1e-12, atol=1e-18)


# --- ddim_sample -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize(("method", "n"), [("uniform", 50), ("uniform", 20), ("trailing", 25)])
def test_ddim_sample_matches_diffusers_loop(method, n, param):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []

    def model(x, t):
        seen.append(t.clone())
        return toy_model(x, t)

    ours = ddim_sample(model, x_T, AC, num_steps=n, method=method, parameterization=param)
    spacing, offset = ("leading", 1) if method == "uniform" else ("trailing", 0)
    theirs, their_steps = diffusers_loop(x_T, AC, n, spacing, offset, param)
    assert [int(t[0]) for t in seen] == their_steps.tolist()
    assert all(t.dtype == torch.int64 and t.shape == (2,) for t in seen)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)


def test_zero_terminal_snr_trailing_v_matches_diffusers_loop():
    ac = np.cumprod(1 - rescale_zero_terminal_snr(SD_BETAS))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(toy_model, x_T, ac, num_steps=20, method="trailing", parameterization="v")
    theirs, _ = diffusers_loop(x_T, ac, 20, "trailing", 0, "v")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, theirs, rtol=0, atol=5e-5)
