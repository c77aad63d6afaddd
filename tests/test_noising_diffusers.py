"""Parity of the noising identities with diffusers' DDPMScheduler (add_noise, get_velocity)."""

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_ldm.noising import get_v, q_sample
from tests.test_noising import TABLES, T, sample


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_q_sample_parity_with_diffusers_add_noise_float32(scheduler):
    x0, eps = sample((64, 4, 8, 8), seed=2)
    t = torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3))
    t[:4] = torch.tensor([0, 1, 998, 999])
    ref = scheduler.add_noise(x0, eps, t)
    # with diffusers' own float32 tables: bitwise equal
    ac = scheduler.alphas_cumprod
    assert torch.equal(q_sample(x0, t, eps, ac**0.5, (1 - ac) ** 0.5), ref)
    # with float64-derived tables (ours): diffusers' float32 cumprod drifts by < 1e-6 in the coefficients;
    # measured largest difference 2.6e-6 on unit-normal data
    diff = (q_sample(x0, t, eps, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]) - ref).abs().max().item()
    assert diff < 5e-6


def test_get_v_parity_with_diffusers_get_velocity(scheduler):
    x0, eps = sample((16, 4, 4, 4), seed=4)
    t = torch.linspace(0, T - 1, 16).long()
    ac = scheduler.alphas_cumprod
    ours = get_v(x0, eps, t, ac**0.5, (1 - ac) ** 0.5)
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, eps, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diffusers_half_precision_path_loses_the_noise_at_t0_ours_keeps_it(dtype, scheduler):
    x0, eps = sample((6, 4, 8, 8), seed=5, dtype=dtype)
    t = torch.tensor([0, 1, 0, 1, 10, 10])
    assert not torch.equal(q_sample(x0, t, eps, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])[:4], x0[:4])
    if dtype == torch.bfloat16:
        # the trap: diffusers casts ā to bf16 first, 0.99915 rounds to 1 and the noise vanishes
        assert torch.equal(scheduler.add_noise(x0, eps, t)[:4], x0[:4])
