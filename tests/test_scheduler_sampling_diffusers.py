"""diffusers schedulers through ``sample(sampler=...)`` on a LatentDiffusionMixin.

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor, nn

from lightning_ldm.callbacks import ScheduleCallback
from lightning_ldm.latent import LatentDiffusionMixin
from tests.lightning_helpers import make_trainer
from tests.test_latent import CTX, LDM, SEED, Z, loader

SD = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}


@pytest.fixture(scope="module")
def trained() -> LDM:
    """A class-conditional LDM on Stable Diffusion's schedule, trained for 3 steps, in eval mode."""
    model = LDM("crossattn", **SD)
    make_trainer(max_steps=3, callbacks=[ScheduleCallback(seed=SEED)]).fit(model, loader())
    return model.eval()


def _inputs(model: LDM, batch: int = 4) -> tuple[Tensor, Tensor]:
    x_T = torch.randn(batch, Z, 4, 4, generator=torch.Generator().manual_seed(0))
    context = model.class_embed(torch.arange(batch) % 4)[:, None, :].detach()
    return x_T, context


def test_ddim_scheduler_equals_our_ddim(trained: LDM) -> None:
    x_T, context = _inputs(trained)
    ours = trained.sample(x_T.shape, cond=context, x_T=x_T, num_steps=50, method="uniform", decode=False)
    config = trained.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    # our "uniform" steps are diffusers' "leading" spacing with steps_offset=1; the last step goes to ā_0
    sched = DDIMScheduler(
        **config, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    theirs = trained.sample(x_T.shape, cond=context, x_T=x_T, num_steps=50, decode=False, sampler=sched)
    assert torch.isfinite(ours).all()
    diff, size = float((ours - theirs).abs().max()), float(ours.abs().max())
    print(f"DDIMScheduler vs our DDIM, 50 steps: max |diff| {diff:.3g} at max |x| {size:.3g}")
    assert diff <= 2e-6 * size  # float32 rounding (their ā is computed in float32, ours in float64)
    sched.alphas_cumprod = trained.noise_schedule.table("alphas_cumprod").clone()  # type: ignore[union-attr]  # the same ā: only the loop arithmetic differs
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    same_table = trained.sample(x_T.shape, cond=context, x_T=x_T, num_steps=50, decode=False, sampler=sched)
    diff = float((ours - same_table).abs().max())
    print(f"  with our float32 ā: {diff:.3g}")
    assert diff <= 2e-6 * size


SCHEDULERS: dict[str, Any] = {
    "dpmsolver++": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_multistep_schedulers_sample_the_mixin_model(trained: LDM, name: str) -> None:
    x_T, context = _inputs(trained)
    config = trained.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    latents = trained.sample(
        x_T.shape, cond=context, x_T=x_T, num_steps=20, decode=False, sampler=SCHEDULERS[name](config)
    )
    assert latents.shape == x_T.shape and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    images = trained.sample(x_T.shape, cond=context, x_T=x_T, num_steps=20, sampler=SCHEDULERS[name](config))
    assert images.shape == (4, 3, 8, 8) and torch.isfinite(images).all()
    # the same probability-flow ODE as DDIM with many steps: 20 solver steps land within a few percent of it
    reference = trained.sample(x_T.shape, cond=context, x_T=x_T, num_steps=500, method="linspace", decode=False)
    gap = float((latents - reference).abs().max()) / float(reference.abs().max())
    print(f"{name}, 20 steps vs DDIM 500 steps: max |diff| / max |x| = {gap:.3g}")
    assert gap < 0.06


# --------------------------------------------------------------------------------- exact eps of Gaussian data
MU, S = 1.5, 0.5


class GaussianEps(nn.Module):
    """The optimal ε-predictor for data ~ N(μ, s²I): E[ε | x_t] = √(1−ā)(x_t − √ā·μ) / (ā·s² + 1 − ā)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod  # float64

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t.long()].view(-1, *([1] * (x.ndim - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * S**2 + 1 - a)).to(x.dtype)


class Analytic(LatentDiffusionMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_schedule(**SD)  # type: ignore[arg-type]
        self.register_conditioning(None)
        assert self.noise_schedule is not None
        self.model = GaussianEps(torch.from_numpy(self.noise_schedule.tables_float64["alphas_cumprod"].copy()))


@pytest.mark.parametrize(("name", "tolerance"), [("dpmsolver++", 0.015), ("unipc", 0.02)])
def test_solver_with_the_exact_eps_lands_on_the_gaussian(name: str, tolerance: float) -> None:
    module = Analytic()
    assert module.noise_schedule is not None
    ac = module.noise_schedule.tables_float64["alphas_cumprod"]
    sched = SCHEDULERS[name](module.noise_schedule.to_diffusers_config())
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = module.sample(x_T.shape, x_T=x_T, sampler=sched, num_steps=20).double()
    # the exact answer: the probability-flow ODE keeps z = (x_t − √ā_t·μ)/√(ā_t·s² + 1 − ā_t) from the first
    # timestep to the last one, t_l; the final step to σ = 0 returns E[x_0 | x_{t_l}] = μ + s²√ā_l/√(ā_l·s² + 1 − ā_l)·z
    a_first, a_last = ac[int(sched.timesteps[0])], ac[int(sched.timesteps[-1])]
    z = (x_T.double() - math.sqrt(a_first) * MU) / math.sqrt(a_first * S**2 + 1 - a_first)
    exact = MU + S**2 * math.sqrt(a_last) / math.sqrt(a_last * S**2 + 1 - a_last) * z
    err, rms = float((out - exact).abs().max()), float((out - exact).pow(2).mean().sqrt())
    mean, std = float(out.mean()), float(out.std())
    print(f"{name}, 20 steps, exact eps: max |x - exact| {err:.3g} (rms {rms:.3g}); mean {mean:.4f}, std {std:.4f}")
    assert err < tolerance
    # near the data distribution: what is left is the schedule's non-zero terminal SNR (x_T ~ N(0, 1) instead of
    # N(√ā_T·μ, …): −0.05 on the mean) and the final denoising step (std × 0.91)
    assert mean == pytest.approx(MU, abs=0.06) and std == pytest.approx(S, abs=0.06)


# ------------------------------------------------------------------------------ guidance with CompVis' dicts
def test_guidance_with_nested_compvis_dicts_through_a_scheduler() -> None:
    model = LDM("hybrid", **SD).eval()
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(3, Z, 4, 4, generator=g)
    image = torch.randn(3, Z, 4, 4, generator=g)
    context = torch.randn(3, 2, CTX, generator=g)
    cond = {"c_concat": [image], "c_crossattn": [context]}
    uncond = {"c_concat": [image], "c_crossattn": [torch.zeros(3, 2, CTX)]}
    config = model.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    scale = 4.0
    ours = model.sample(
        x_T.shape, cond=cond, uncond=uncond, guidance_scale=scale, x_T=x_T, num_steps=10, decode=False,
        sampler=SCHEDULERS["dpmsolver++"](config),
    )  # fmt: skip
    # by hand: the two branches as separate calls, combined as out_u + s·(out_c − out_u)
    sched = SCHEDULERS["dpmsolver++"](config)
    sched.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tb = t.expand(3)
            out_u, out_c = model.apply_model(x, tb, uncond), model.apply_model(x, tb, cond)
            x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    diff = float((ours - x).abs().max())
    print(f"guided DPM-Solver++ with dict conds, batched vs separate calls: {diff:.3g} (max |x| {x.abs().max():.3g})")
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    unguided = model.sample(
        x_T.shape, cond=cond, x_T=x_T, num_steps=10, decode=False, sampler=SCHEDULERS["dpmsolver++"](config)
    )
    assert float((ours - unguided).abs().max()) > 0.1  # the guidance changed the samples
