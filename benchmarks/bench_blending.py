"""AlphaBlender: ours vs the reference formula ``α·x_s + (1−α)·x_t`` in eager torch, on a 5-D video tensor.

The layout is Stable Video Diffusion's VideoResBlock: ``(B, C, T, H, W)`` tensors, ``learned_with_images``, pattern
``"b t -> b 1 t 1 1"``, the ``(B, T)`` image-only indicator all false (video frames). The reference module is rebuilt
here from the reference code (sgm's AlphaBlender): ``where`` + ``rearrange`` for α, then three elementwise passes.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from benchmarks._harness import Config, Result, interleaved, mib, us
from lightning_ldm.blending import AlphaBlender

SHAPE = (2, 64, 8, 32, 32)  # (B, C, T, H, W): 1 Mi elements, 4 MiB in float32
QUICK_SHAPE = (1, 2, 3, 4, 4)
PATTERN = "b t -> b 1 t 1 1"
GOAL = 0.45


class SeedAlphaBlender(nn.Module):
    """The reference ``learned_with_images`` blender, as CompVis writes it."""

    def __init__(self, alpha: float, rearrange_pattern: str) -> None:
        super().__init__()
        self.rearrange_pattern = rearrange_pattern
        self.register_parameter("mix_factor", nn.Parameter(torch.Tensor([alpha])))

    def get_alpha(self, image_only_indicator: Tensor) -> Tensor:
        alpha = torch.where(
            image_only_indicator.bool(),
            torch.ones(1, 1, device=image_only_indicator.device),
            rearrange(torch.sigmoid(self.mix_factor), "... -> ... 1"),
        )
        return rearrange(alpha, self.rearrange_pattern)

    def forward(self, x_spatial: Tensor, x_temporal: Tensor, image_only_indicator: Tensor) -> Tensor:
        alpha = self.get_alpha(image_only_indicator)
        return alpha.to(x_spatial.dtype) * x_spatial + (1.0 - alpha).to(x_spatial.dtype) * x_temporal


def run(cfg: Config) -> list[Result]:
    shape = QUICK_SHAPE if cfg.quick else SHAPE
    gen = torch.Generator().manual_seed(0)
    ours = AlphaBlender(0.5, "learned_with_images", rearrange_pattern=PATTERN)
    seed = SeedAlphaBlender(0.5, PATTERN)
    indicator = torch.zeros(shape[0], shape[2], dtype=torch.bool)
    results: list[Result] = []
    for dtype, goal in ((torch.float32, GOAL), (torch.bfloat16, None)):
        x_s = torch.randn(shape, generator=gen).to(dtype)
        x_t = torch.randn(shape, generator=gen).to(dtype)
        with torch.no_grad():
            a, b = ours(x_s, x_t, indicator), seed(x_s, x_t, indicator)
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"AlphaBlender: ours {a.dtype} {tuple(a.shape)}, seed {b.dtype} {tuple(b.shape)}")
        max_diff = float((a.float() - b.float()).abs().max())
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # lerp rounds once, CompVis three times
        if max_diff > tol:
            raise AssertionError(f"AlphaBlender {dtype}: ours differs from the reference formula by {max_diff}")

        def fwd(module: nn.Module, x_s: Tensor = x_s, x_t: Tensor = x_t) -> Tensor:
            with torch.no_grad():
                return module(x_s, x_t, indicator)

        def train(module: nn.Module, x_s: Tensor = x_s, x_t: Tensor = x_t) -> None:
            xs, xt = x_s.detach().requires_grad_(), x_t.detach().requires_grad_()
            module(xs, xt, indicator).float().sum().backward()

        timing = interleaved(
            {
                "ours": lambda: fwd(ours),
                "seed": lambda: fwd(seed),
                "ours_train": lambda: train(ours),
                "seed_train": lambda: train(seed),
            },
            cfg,
        )
        m = timing.median
        name = "float32" if dtype == torch.float32 else "bfloat16"
        case = f"{name} {tuple(shape)} ({mib(x_s.numel() * x_s.element_size())}), learned_with_images"
        results.append(
            Result(
                "AlphaBlender",
                f"{case}, forward (no grad)",
                "ours / reference formula",
                timing.ratio("ours", "seed"),
                goal,
                context=f"ours {us(m['ours'])}, seed {us(m['seed'])}; max |ours - seed| = {max_diff:.2g}",
                extra={"median_s": m, "iqr": timing.spread("ours", "seed"), "max_abs_diff": max_diff},
                goal_note="" if goal is not None else "context",
            )
        )
        results.append(
            Result(
                "AlphaBlender",
                f"{case}, forward + backward",
                "ours / reference formula",
                timing.ratio("ours_train", "seed_train"),
                None,
                context=f"ours {us(m['ours_train'])}, seed {us(m['seed_train'])} (grads of both inputs and mix_factor)",
                extra={"median_s": m, "iqr": timing.spread("ours_train", "seed_train")},
                goal_note="context",
            )
        )
    return results
