"""Training step: DiffusionMixin + Lightning Trainer vs the same model, loss and optimizer in a hand-written loop.

Both sides train the same network object (the plain loop with an AdamW of its own), the same DataLoader, eps target,
L2 loss.
Lightning's step is timed inside ``fit`` by a callback: from one ``on_train_batch_start`` to the next (the whole
cycle: training_step, backward, optimizer step, zero_grad, hooks, fetching the next batch), and from
``on_train_batch_start`` to ``on_train_batch_end``. The plain loop is timed over the same spans. Each round runs one
``fit`` and one plain loop (order alternating), drops the warm-up steps and takes the median step of each.
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import Config, Result, us
from benchmarks._models import LitDenoiser

# (batch, latent size, width, blocks, warm-up steps, timed steps): a plain step of ~15 ms and one of ~50 ms on 2 cores
CASES = [(8, 16, 64, 3, 5, 20), (8, 32, 64, 3, 3, 12)]
QUICK_CASES = [(2, 8, 16, 1, 1, 3)]
ROUNDS = 11
GOAL = 1.05
MIN_PLAIN_STEP_S = 10e-3


class StepTimer(L.Callback):
    """Record the clock at every ``on_train_batch_start`` and ``on_train_batch_end``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append(self.clock())

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(self.clock())


def spans(starts: list[float], ends: list[float], warmup: int) -> tuple[float, float]:
    """Median cycle (start to next start) and median start-to-end span, after ``warmup`` steps."""
    cycles = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    inner = [e - s for s, e in zip(starts[warmup:], ends[warmup:], strict=False)]
    return statistics.median(cycles), statistics.median(inner)


def run(cfg: Config) -> list[Result]:
    results: list[Result] = []
    for case in QUICK_CASES if cfg.quick else CASES:
        results += run_case(cfg, *case)
    return results


def run_case(cfg: Config, batch: int, size: int, width: int, blocks: int, warmup: int, steps: int) -> list[Result]:
    rounds = 1 if cfg.quick else min(cfg.rounds, ROUNDS)
    clock = cfg.timer()
    torch.manual_seed(0)
    lit = LitDenoiser(width=width, blocks=blocks)
    net = lit.net  # the very same parameters (same memory), with an optimizer of its own
    opt = torch.optim.AdamW(net.parameters(), lr=lit.lr)
    schedule = lit.noise_schedule
    assert schedule is not None
    sqrt_abar = schedule.table("sqrt_alphas_cumprod").clone()
    sqrt_1m_abar = schedule.table("sqrt_one_minus_alphas_cumprod").clone()
    T = schedule.num_timesteps
    n_steps = warmup + steps + 1
    loader = DataLoader(TensorDataset(torch.randn(n_steps * batch, 4, size, size)), batch_size=batch)

    def plain() -> tuple[float, float]:
        starts: list[float] = []
        ends: list[float] = []
        net.train()
        for (x,) in loader:
            starts.append(clock())
            t = torch.randint(0, T, (x.shape[0],))
            noise = torch.randn_like(x)
            x_t = sqrt_abar[t].view(-1, 1, 1, 1) * x + sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
            loss = F.mse_loss(net(x_t, t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ends.append(clock())
        return spans(starts, ends, warmup)

    def lightning() -> tuple[float, float]:
        timer = StepTimer(clock)
        trainer = L.Trainer(
            max_steps=n_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            callbacks=[timer],
        )
        trainer.fit(lit, train_dataloaders=loader)
        return spans(timer.starts, timer.ends, warmup)

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lightning()  # first fit of the process: imports, one-time set-up
            plain()
            samples: dict[str, list[tuple[float, float]]] = {"lightning": [], "plain": []}
            for r in range(rounds):
                order = [("lightning", lightning), ("plain", plain)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    samples[name].append(fn())
    finally:
        lightning_log.setLevel(level)

    def ratio(i: int) -> float:
        return statistics.median(a[i] / b[i] for a, b in zip(samples["lightning"], samples["plain"], strict=True))

    med = {name: tuple(statistics.median(s[i] for s in v) for i in range(2)) for name, v in samples.items()}
    plain_step = med["plain"][0]
    case = (
        f"ConvDenoiser width {width}, {blocks} blocks, latents ({batch}, 4, {size}, {size}), AdamW; "
        f"{steps} steps x {rounds} rounds after {warmup} warm-up steps"
    )
    ctx = (
        f"per step: Lightning {us(med['lightning'][0])} cycle / {us(med['lightning'][1])} start-to-end; plain "
        f"{us(med['plain'][0])} / {us(med['plain'][1])}"
        + ("" if plain_step >= MIN_PLAIN_STEP_S or cfg.quick else " (plain step below the 10 ms the issue asks for)")
    )
    extra = {"median_s": med, "samples": samples, "plain_step_s": plain_step}
    return [
        Result(
            "training step",
            f"{case}: full cycle (batch start to next batch start)",
            "mixin + Trainer / plain loop",
            ratio(0),
            GOAL,
            context=ctx,
            extra=extra,
        ),
        Result(
            "training step",
            f"{case}: on_train_batch_start to on_train_batch_end",
            "mixin + Trainer / plain loop",
            ratio(1),
            GOAL,
            context=ctx,
            extra=extra,
        ),
    ]
