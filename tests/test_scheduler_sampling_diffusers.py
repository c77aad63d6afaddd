"""diffusers schedulers through ``sample(sampler=...)`` on a LatentDiffusionMixin.

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor, nn

from lightning_ldm._checks import SCHEDULER_ATOL, check_scheduler
from lightning_ldm.callbacks import DiffusionSeedCallback, SampleLogger
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.scheduler_sampling import scheduler_sample
from tests.lightning_helpers import make_trainer
from tests.test_latent import CTX, LDM, SEED, T, Z, loader

SD = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}


@pytest.fixture(scope="module")
def trained() -> LDM:
    """A class-conditional LDM on Stable Diffusion's schedule, trained for 3 steps, in eval mode."""
    model = LDM("crossattn", **SD)
    make_trainer(max_steps=3, callbacks=[DiffusionSeedCallback(seed=SEED)]).fit(model, loader())
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


# ----------------------------------------------------------- mismatched schedulers are refused (issue 13, point 5)
# every schedule diffusers can express (ours on the left), with the betas as trained_betas where it has no name
KINDS: dict[str, dict[str, Any]] = {
    "linear (scaled_linear)": {**SD, "beta_schedule": "linear"},
    "sqrt_linear (linear)": {"beta_schedule": "sqrt_linear", "timesteps": 1000},
    "cosine (squaredcos_cap_v2)": {"beta_schedule": "cosine", "timesteps": 1000},
    "linear, zero terminal SNR": {**SD, "beta_schedule": "linear", "zero_terminal_snr": True},
    "sqrt_linear, zero terminal SNR": {"beta_schedule": "sqrt_linear", "timesteps": 1000, "zero_terminal_snr": True},
    "cosine, zero terminal SNR": {"beta_schedule": "cosine", "timesteps": 1000, "zero_terminal_snr": True},
    "sqrt (trained_betas)": {"beta_schedule": "sqrt", "timesteps": 1000},
    "linear, T = 20": {"beta_schedule": "linear", "timesteps": 20},
}
ALL_SCHEDULERS: dict[str, Any] = {"ddim": DDIMScheduler.from_config, **SCHEDULERS}


def _diffusers_config(schedule: NoiseSchedule) -> dict[str, Any]:
    try:
        return schedule.to_diffusers_config()
    except ValueError:  # "sqrt": no diffusers name, its betas go as trained_betas
        return {
            "num_train_timesteps": schedule.num_timesteps,
            "trained_betas": schedule.tables_float64["betas"].tolist(),
        }


@pytest.mark.parametrize("kind", list(KINDS))
def test_matching_schedulers_pass_and_the_tolerance_covers_float32(kind: str) -> None:
    schedule = NoiseSchedule(**KINDS[kind])
    ours = schedule.tables_float64["alphas_cumprod"]
    worst = 0.0
    for make in ALL_SCHEDULERS.values():
        sched = make(_diffusers_config(schedule))
        check_scheduler(sched, schedule, min(50, schedule.num_timesteps - 1))
        worst = max(worst, float(np.abs(sched.alphas_cumprod.double().numpy() - ours).max()))
    print(f"{kind}: max |ā_diffusers - ā_ours| over DDIM, DPM-Solver++, Euler, UniPC = {worst:.3g}")
    assert worst < 6e-7 and worst * 15 < SCHEDULER_ATOL  # float32 rounding, well inside the tolerance


def test_a_one_percent_change_of_beta_end_is_refused() -> None:
    schedule = NoiseSchedule(**SD)
    near = {**schedule.to_diffusers_config(), "beta_end": SD["linear_end"] * 1.01}
    with pytest.raises(ValueError, match=r"at t=505 the scheduler has 0\.267575 and the model 0\.269698 \(\|dif"):
        check_scheduler(DDIMScheduler.from_config(near), schedule)


def _refused(model: LDM, sched: Any, match: str, num_steps: int = 5) -> None:
    x_T = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(0))
    schedule = model.noise_schedule
    with pytest.raises(ValueError, match=match):
        model.sample(x_T.shape, x_T=x_T, sampler=sched, num_steps=num_steps)
    with pytest.raises(ValueError, match=match):
        model.sample(x_T.shape, x_T=x_T, sampler=sched, num_steps=num_steps, decode=False)
    with pytest.raises(ValueError, match=match):
        scheduler_sample(lambda x, t: x, x_T, sched, num_steps=num_steps, schedule=schedule)
    with pytest.raises(ValueError, match=match):
        check_scheduler(sched, schedule, num_steps)


@pytest.mark.parametrize("name", list(ALL_SCHEDULERS))
def test_a_scheduler_of_another_parameterization_is_refused(name: str) -> None:
    model = LDM(None, parameterization="v").eval()
    config = {**model.noise_schedule.to_diffusers_config(), "prediction_type": "epsilon"}  # type: ignore[union-attr]
    _refused(
        model,
        ALL_SCHEDULERS[name](config),
        r"has prediction_type='epsilon' but the model predicts 'v' \(prediction_type='v_prediction'\); build it "
        r"with \w+\.from_config\(module\.noise_schedule\.to_diffusers_config\(\)\)",
    )


@pytest.mark.parametrize("name", list(ALL_SCHEDULERS))
def test_a_scheduler_of_another_schedule_is_refused(name: str) -> None:
    make = ALL_SCHEDULERS[name]
    # the same name, another schedule: diffusers' "linear" is our "sqrt_linear"
    sd = LDM(None, **SD).eval()
    config = {**sd.noise_schedule.to_diffusers_config(), "beta_schedule": "linear"}  # type: ignore[union-attr]
    _refused(sd, make(config), r"alphas_cumprod differs from the model's schedule: at t=\d+ the scheduler has")
    # our zero-terminal-SNR schedule, a scheduler without the rescale (largest difference in the middle)
    ztsnr = LDM(None, **SD, zero_terminal_snr=True).eval()
    config = {**ztsnr.noise_schedule.to_diffusers_config(), "rescale_betas_zero_snr": False}  # type: ignore[union-attr]
    _refused(ztsnr, make(config), r"at t=506 the scheduler has 0\.268381 and the model 0\.233057 ")
    # another number of training timesteps (the default 1000 on a 20-step model)
    _refused(LDM(None).eval(), make({}), r"has num_train_timesteps=1000 but the model's schedule has 20")


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_more_steps_than_the_scheduler_supports_are_refused_not_nan(name: str) -> None:
    model = LDM(None).eval()  # T = 20
    config = model.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    x_T = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(0))
    ok = model.sample(x_T.shape, x_T=x_T, sampler=SCHEDULERS[name](config), num_steps=T - 1, decode=False)
    assert torch.isfinite(ok).all()  # 19 steps: distinct timesteps
    for steps in (T, T + 5):  # the samples were all NaN here before
        _refused(model, SCHEDULERS[name](config), rf"num_steps={steps} is more than \w+ supports on its 20 training "
                 r"timesteps: its timesteps repeat \(\d+ twice\), so a step has size 0", num_steps=steps)  # fmt: skip


def test_ddim_scheduler_refusal_names_num_steps_and_euler_takes_more_steps_than_t() -> None:
    model = LDM(None).eval()
    config = model.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    _refused(
        model,
        DDIMScheduler.from_config(config),
        r"num_steps=21 is more than DDIMScheduler supports on its 20 training timesteps: `num_inference_steps`: 21",
        num_steps=T + 1,
    )
    x_T = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(0))
    euler = model.sample(x_T.shape, x_T=x_T, sampler=SCHEDULERS["euler"](config), num_steps=T + 5, decode=False)
    assert torch.isfinite(euler).all()  # Euler's timesteps are real numbers: they never repeat


def test_return_intermediates_with_a_scheduler_is_refused() -> None:
    model = LDM(None).eval()
    sched = DDIMScheduler.from_config(model.noise_schedule.to_diffusers_config())  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"return_intermediates and clip_x0 are options of sampler='ddim'; a sch"):
        model.sample((2, Z, 4, 4), sampler=sched, num_steps=5, return_intermediates=True)
    with pytest.raises(ValueError, match=r"return_intermediates and clip_x0 are options of sampler='ddim'; a sch"):
        model.sample((2, Z, 4, 4), sampler=sched, num_steps=5, clip_x0=1.0)


def test_sample_logger_refuses_a_mismatched_scheduler_at_fit_start() -> None:
    model = LDM(None)
    sched = DPMSolverMultistepScheduler.from_config(model.noise_schedule.to_diffusers_config())  # type: ignore[union-attr]
    steps: list[int] = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            steps.append(trainer.global_step)

    logger = SampleLogger(
        (2, Z, 4, 4), every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": T, "sampler": sched}
    )
    with pytest.raises(ValueError, match=r"num_steps=20 is more than DPMSolverMultistepScheduler supports"):
        make_trainer(max_steps=4, callbacks=[logger, Count()]).fit(model, loader())
    other = DDIMScheduler.from_config({})  # 1000 training timesteps
    logger = SampleLogger(
        (2, Z, 4, 4), every_n_steps=3, at_validation_end=False, sample_kwargs={"num_steps": 5, "sampler": other}
    )
    with pytest.raises(ValueError, match=r"DDIMScheduler has num_train_timesteps=1000 but the model's schedule has 20"):
        make_trainer(max_steps=4, callbacks=[logger, Count()]).fit(model, loader())
    assert steps == []  # refused before the first training step
