"""Timestep embedding: ours (function and module) vs diffusers' get_timestep_embedding, outputs bitwise equal.

diffusers (``flip_sin_to_cos=True, downscale_freq_shift=0``) gives CompVis' numbers: it rebuilds the frequency row
and concatenates sin/cos then flips them on every call. Ours caches the frequency row and, for integer timesteps on
the CPU (the training case), a table of whole embeddings; fractional timesteps take the direct path (reported too).
"""

from __future__ import annotations

import torch

from benchmarks._harness import Config, Result, interleaved, us
from lightning_ldm.embedding import SinusoidalTimestepEmbedding, timestep_embedding

CASES = [(256, 320), (4096, 1280)]
QUICK_CASES = [(8, 16), (16, 33)]
GOAL = 0.6


def run(cfg: Config) -> list[Result]:
    from diffusers.models.embeddings import get_timestep_embedding

    gen = torch.Generator().manual_seed(0)
    results: list[Result] = []
    for n, dim in QUICK_CASES if cfg.quick else CASES:
        module = SinusoidalTimestepEmbedding(dim)
        t_int = torch.randint(0, 1000, (n,), generator=gen)
        t_frac = torch.rand(n, generator=gen) * 999.0  # e.g. continuous-time or DPM-solver timesteps

        def diffusers(t: torch.Tensor, dim: int = dim) -> torch.Tensor:
            return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)

        for t, kind in ((t_int, "integer"), (t_frac, "fractional")):
            ref = diffusers(t)
            for name, out in (("function", timestep_embedding(t, dim)), ("module", module(t))):
                if not torch.equal(out, ref):
                    diff = (out - ref).abs().max().item()
                    raise AssertionError(f"embedding {name} ({n}, {dim}) {kind}: not bitwise equal, max diff {diff}")

        fns = {
            "function": lambda t=t_int, dim=dim: timestep_embedding(t, dim),
            "module": lambda t=t_int, module=module: module(t),
            "diffusers": lambda t=t_int: diffusers(t),
            "function_fractional": lambda t=t_frac, dim=dim: timestep_embedding(t, dim),
            "diffusers_fractional": lambda t=t_frac: diffusers(t),
        }
        timing = interleaved(fns, cfg)
        m = timing.median
        ctx = (
            f"ours {us(m['function'])} (function), {us(m['module'])} (module), diffusers {us(m['diffusers'])}; "
            "outputs bitwise equal (asserted)"
        )
        for form in ("function", "module"):
            results.append(
                Result(
                    "timestep embedding",
                    f"({n}, {dim}), integer t, {form}",
                    "ours / diffusers `get_timestep_embedding`",
                    timing.ratio(form, "diffusers"),
                    GOAL,
                    context=ctx,
                    extra={"median_s": m, "iqr": timing.spread(form, "diffusers"), "inner": timing.inner},
                )
            )
        results.append(
            Result(
                "timestep embedding",
                f"({n}, {dim}), fractional t (direct path), function",
                "ours / diffusers `get_timestep_embedding`",
                timing.ratio("function_fractional", "diffusers_fractional"),
                None,
                context=(
                    f"ours {us(m['function_fractional'])}, diffusers {us(m['diffusers_fractional'])}; no table: "
                    "cached frequencies and cos/sin written in place; bitwise equal (asserted)"
                ),
                extra={"median_s": m, "iqr": timing.spread("function_fractional", "diffusers_fractional")},
                goal_note="context (the goal is for the cached path)",
            )
        )
    return results
