"""q_sample: ours vs the memory floor and vs diffusers' DDPMScheduler.add_noise, plus the accuracy bought.

The floor is one ``torch.add(x, noise, out=out)``: it reads the two inputs and writes one result, the bytes any
q_sample must move. diffusers gathers ``ā`` in the sample's dtype, takes the square roots there and makes three
passes; in bf16 that loses the coefficients (``ā_0 = 0.99915`` rounds to 1, so √(1 − ā) = 0: no noise at t = 0).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from benchmarks._harness import Config, Result, interleaved, mib, us
from lightning_ldm import noising

T = 1000
SHAPES = [(16, 4, 64, 64), (32, 4, 64, 64), (64, 4, 64, 64), (8, 16, 4, 32, 32)]
QUICK_SHAPES = [(4, 4, 8, 8), (2, 3, 4, 8, 8)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# issue 8's goals for the eager q_sample: (ratio to the floor, the size from which it applies), ratio to diffusers
FLOOR_GOAL = {"float32": (1.8, 2**20), "bfloat16": (2.5, 0)}
DIFFUSERS_GOAL = {"float32": 0.6, "bfloat16": 0.8}


def sd_alphas_cumprod() -> Tensor:
    """Stable Diffusion's schedule (CompVis "linear" = diffusers "scaled_linear", 0.00085 → 0.012), float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ulp(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Unit in the last place of ``|v|`` (float64 tensor) in ``dtype``."""
    info = torch.finfo(dtype)
    mant = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[dtype]
    _, e = torch.frexp(v.abs().clamp_min(info.tiny))
    return torch.pow(2.0, (e - mant).double())


def max_err_ulps(out: Tensor, x: Tensor, noise: Tensor, a: Tensor, b: Tensor) -> float:
    """Largest ``|out − (a·x + b·noise)|`` (exact, float64) in ulps of ``|a·x| + |b·noise|`` in ``out``'s dtype."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    ax = a.double().view(shape) * x.double()
    bn = b.double().view(shape) * noise.double()
    err = (out.double() - (ax + bn)).abs()
    return float((err / ulp(ax.abs() + bn.abs(), out.dtype)).max())


def run(cfg: Config) -> list[Result]:
    from diffusers import DDPMScheduler

    ac64 = sd_alphas_cumprod()
    sa = ac64.sqrt().float()  # the tables a DiffusionMixin registers (float32 buffers)
    s1 = (1.0 - ac64).sqrt().float()
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    results: list[Result] = []

    # --- coefficient accuracy: what each path actually multiplies the noise by, in bf16 -------------------------
    t_all = torch.arange(T)
    exact = (1.0 - ac64).sqrt()
    zeros = torch.zeros(T, 1, dtype=torch.bfloat16)
    ones = torch.ones(T, 1, dtype=torch.bfloat16)
    ours_coef = noising.q_sample(zeros, t_all, ones, sa, s1).double().squeeze(1)
    diff_coef = sched.add_noise(zeros, ones, t_all).double().squeeze(1)
    ours_rel = float(((ours_coef - exact).abs() / exact).max())
    diff_rel = float(((diff_coef - exact).abs() / exact).max())
    gathered_rel = float(((s1.double() - exact).abs() / exact).max())
    results.append(
        Result(
            "q_sample accuracy",
            "bf16, noise coefficient sqrt(1 - ā_t) as applied, max rel. error over t = 0..999",
            "ours vs exact (diffusers in context)",
            ours_rel,
            2.0**-8,
            unit="rel",
            goal_note="bf16 rounding of the result only",
            context=(
                f"ours {ours_rel:.2g} (coefficients gathered in float32: {gathered_rel:.2g}); diffusers bf16 path "
                f"{diff_rel:.2g}; at t=0 exact {float(exact[0]):.4f}, ours {float(ours_coef[0]):.4f}, "
                f"diffusers {float(diff_coef[0]):.4f}"
            ),
            extra={"ours_rel_err": ours_rel, "diffusers_rel_err": diff_rel, "gathered_f32_rel_err": gathered_rel},
        )
    )

    for shape in QUICK_SHAPES if cfg.quick else SHAPES:
        for dname, dtype in DTYPES.items():
            x = torch.randn(shape, generator=gen).to(dtype)
            noise = torch.randn(shape, generator=gen).to(dtype)
            t = torch.randint(0, T, (shape[0],), generator=gen)
            out = torch.empty_like(x)
            nbytes = x.numel() * x.element_size()

            t0 = time.perf_counter()
            ours_out = noising.q_sample(x, t, noise, sa, s1)
            first_call = time.perf_counter() - t0

            # numbers: the same bits as the reference formula with float32 coefficients; the error against the exact
            # result is that of three float32 roundings (<= 1.5 ulp of |a·x| + |b·ε|)
            bshape = (-1,) + (1,) * (x.ndim - 1)
            reference_out = (sa[t].view(bshape) * x + s1[t].view(bshape) * noise).to(dtype)
            err = max_err_ulps(ours_out, x, noise, sa[t], s1[t])
            if not torch.equal(ours_out, reference_out) or err > 1.5:
                raise AssertionError(
                    f"q_sample {dname} {shape}: bitwise equal to the reference formula "
                    f"{torch.equal(ours_out, reference_out)}; error {err:.3f} ulp"
                )

            def mixed_dtype(
                x: Tensor = x, t: Tensor = t, noise: Tensor = noise, bshape: tuple[int, ...] = bshape
            ) -> Tensor:
                """The eager form before the explicit upcast: mixed-dtype products (bf16 sample, float32 coef)."""
                a, b = sa.index_select(0, t).view(bshape), s1.index_select(0, t).view(bshape)
                out = x * a
                out += noise * b
                return out.to(x.dtype)

            def fused_multiply_add(
                x: Tensor = x, t: Tensor = t, noise: Tensor = noise, bshape: tuple[int, ...] = bshape
            ) -> Tensor:
                """What meeting the speed goals would take: one rounding fewer (addcmul), not the reference's bits."""
                a, b = sa.index_select(0, t).view(bshape), s1.index_select(0, t).view(bshape)
                if x.dtype != torch.float32:  # coefficients rounded to the sample's dtype, products in its opmath
                    a, b = a.to(x.dtype), b.to(x.dtype)
                return torch.mul(x, a).addcmul_(noise, b)

            fns = {
                "ours": lambda x=x, t=t, noise=noise: noising.q_sample(x, t, noise, sa, s1),
                "fused_multiply_add": fused_multiply_add,
                "floor": lambda x=x, noise=noise, out=out: torch.add(x, noise, out=out),
                "diffusers": lambda x=x, t=t, noise=noise: sched.add_noise(x, noise, t),
                "mixed_dtype": mixed_dtype,
                "ours_unvalidated": lambda x=x, t=t, noise=noise: noising.combine(t, sa, x, s1, noise),
                "floor_alloc": lambda x=x, noise=noise: torch.add(x, noise),
            }
            timing = interleaved(fns, cfg)
            m = timing.median
            case = f"{dname} {shape} ({mib(nbytes)})"
            ctx = (
                f"ours {us(m['ours'])} (eager; {us(m['ours_unvalidated'])} unchecked (noising.combine), "
                f"{us(m['mixed_dtype'])} as mixed-dtype products; {us(m['fused_multiply_add'])} = "
                f"{timing.ratio('fused_multiply_add', 'floor'):.2f}x floor as x*a then addcmul_, not bitwise), "
                f"floor {us(m['floor'])} ({us(m['floor_alloc'])} "
                f"allocating its output), diffusers {us(m['diffusers'])}; bitwise equal to the reference formula "
                f"`a[t]*x + b[t]*noise` (float32 coefficients), {err:.2f} ulp from exact"
            )
            extra = {
                "shape": list(shape),
                "dtype": dname,
                "bytes_per_tensor": nbytes,
                "median_s": m,
                "inner": timing.inner,
                "first_call_s": first_call,
                "max_err_ulp": err,
                "ratio_mixed_dtype_vs_floor": timing.ratio("mixed_dtype", "floor"),
                "ratio_fused_multiply_add_vs_floor": timing.ratio("fused_multiply_add", "floor"),
                "ratio_fused_multiply_add_vs_diffusers": timing.ratio("fused_multiply_add", "diffusers"),
            }
            goal, min_bytes = FLOOR_GOAL[dname]
            applies = nbytes >= min_bytes
            results.append(
                Result(
                    "q_sample",
                    case,
                    "ours / floor `torch.add(x, noise, out=)`",
                    timing.ratio("ours", "floor"),
                    goal if applies else None,
                    context=ctx,
                    extra={**extra, "iqr": timing.spread("ours", "floor")},
                    goal_note="" if applies else f"goal {goal}x applies from {mib(min_bytes)}",
                )
            )
            results.append(
                Result(
                    "q_sample",
                    case,
                    "ours / diffusers `add_noise`",
                    timing.ratio("ours", "diffusers"),
                    DIFFUSERS_GOAL[dname],
                    context=ctx,
                    extra={**extra, "iqr": timing.spread("ours", "diffusers")},
                )
            )
    return results
