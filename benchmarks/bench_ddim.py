"""DDIM sampling: the loop's time beyond the model's forward passes, 50 steps.

Each round times (a) ``ddim_sample(model_fn, x_T, alphas_cumprod, num_steps=50)`` and (b) the same 50 forward calls
alone (same model, same inputs shape, the same timesteps, under no_grad); the overhead is ``(a − b) / a`` in %, the
median over rounds. The mixin's ``sample`` (eval mode, precision context, conditioning plumbing) is measured the
same way, and diffusers' ``DDIMScheduler`` loop is shown for reference.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from benchmarks._harness import Config, Result, interleaved, us
from benchmarks._models import LitDenoiser
from lightning_ldm.ddim import ddim_sample, make_ddim_timesteps

STEPS = 50
BATCH, SIZE, WIDTH, BLOCKS = 4, 16, 64, 3
QUICK = (1, 4, 8, 1)
QUICK_STEPS = 5
ROUNDS = 21
GOAL = 5.0


def run(cfg: Config) -> list[Result]:
    batch, size, width, blocks = QUICK if cfg.quick else (BATCH, SIZE, WIDTH, BLOCKS)
    steps = QUICK_STEPS if cfg.quick else STEPS
    torch.manual_seed(0)
    lit = LitDenoiser(width=width, blocks=blocks).eval()
    net = lit.net
    schedule = lit.noise_schedule
    assert schedule is not None
    alphas_cumprod = schedule.table("alphas_cumprod")
    x_T = torch.randn(batch, 4, size, size)
    ts = make_ddim_timesteps("uniform", steps, schedule.num_timesteps, verbose=False)
    t_rows = [torch.full((batch,), int(t), dtype=torch.long) for t in ts[::-1]]

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t)

    def loop() -> torch.Tensor:
        return ddim_sample(model_fn, x_T, alphas_cumprod, num_steps=steps)

    def mixin_loop() -> torch.Tensor:
        return lit.sample(x_T.shape, num_steps=steps, x_T=x_T)

    @torch.no_grad()
    def forwards() -> None:
        for t in t_rows:
            net(x_T, t)

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.set_timesteps(steps)

    @torch.no_grad()
    def diffusers_loop() -> torch.Tensor:  # context: the same sampling with diffusers' DDIMScheduler.step
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(batch)), t, x).prev_sample
        return x

    if not torch.equal(loop(), mixin_loop()):
        raise AssertionError("DDIM: the mixin's sample and the core's ddim_sample give different samples")
    run_cfg = cfg if cfg.quick else replace(cfg, rounds=min(cfg.rounds, ROUNDS), min_sample_s=0.0)
    timing = interleaved(
        {"loop": loop, "mixin": mixin_loop, "diffusers": diffusers_loop, "forwards": forwards}, run_cfg
    )
    m = timing.median

    def overhead(name: str) -> float:
        fwd = timing.samples["forwards"]
        return statistics.median((a - b) / a * 100.0 for a, b in zip(timing.samples[name], fwd, strict=True))

    case = f"{steps} steps, ConvDenoiser width {width}, {blocks} blocks, x_T ({batch}, 4, {size}, {size}), eta 0"
    ctx = (
        f"loop {us(m['loop'])}, mixin {us(m['mixin'])}, {steps} forwards alone {us(m['forwards'])} "
        f"({us(m['forwards'] / steps)} each); for reference, diffusers' DDIMScheduler loop {us(m['diffusers'])}, "
        f"{overhead('diffusers'):.2f} % beyond the forwards (the small ops between two forwards also let the "
        "thread pool go idle, which the back-to-back forwards never do)"
    )
    return [
        Result(
            "DDIM sampling",
            f"{case}: `lightning_ldm.ddim.ddim_sample`",
            "(loop - forwards) / loop",
            overhead("loop"),
            GOAL,
            unit="%",
            context=ctx,
            extra={"median_s": m},
        ),
        Result(
            "DDIM sampling",
            f"{case}: `DiffusionMixin.sample`",
            "(loop - forwards) / loop",
            overhead("mixin"),
            GOAL,
            unit="%",
            context=ctx,
            extra={"median_s": m},
        ),
    ]
