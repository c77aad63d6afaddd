"""Resume check: the cost of refusing a checkpoint trained with another noise schedule.

Two checks run on load: ``DiffusionMixin.on_load_checkpoint`` compares the checkpoint's schedule fingerprint (a small
dict) with the registered one, and, for state dicts that carry the schedule tables (CompVis ``DDPM`` keeps them as
persistent buffers), ``_load_from_state_dict`` compares each stored table with the registered one. Each is timed
with the check on and off (``check_schedule_on_load``), side by side, and compared with the load itself
(``LitDenoiser.load_from_checkpoint`` of a checkpoint written by ``Trainer.save_checkpoint``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import Config, Result, interleaved, us
from benchmarks._models import CompVisLitDenoiser, LitDenoiser
from lightning_ldm.noise_schedule import SCHEDULE_TABLES

GOAL = 1.0  # "negligible": at most 1 % of the load


def run(cfg: Config) -> list[Result]:
    width, blocks = (16, 1) if cfg.quick else (64, 3)
    torch.manual_seed(0)
    lit = LitDenoiser(width=width, blocks=blocks)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer = L.Trainer(
                max_steps=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                devices=1,
            )
            trainer.fit(lit, DataLoader(TensorDataset(torch.randn(2, 4, 8, 8)), batch_size=2))
            path = Path(tmp) / "model.ckpt"
            trainer.save_checkpoint(path)
        finally:
            lightning_log.setLevel(level)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "schedule" not in ckpt.get("lightning_ldm", {}):
            raise AssertionError("the checkpoint carries no schedule fingerprint")

        # a CompVis-style state dict: the weights plus every schedule table
        tables = {name: lit.noise_schedule.table(name).clone() for name in SCHEDULE_TABLES}  # type: ignore[union-attr]
        state_with_tables = {**lit.state_dict(), **tables}

        checked = CompVisLitDenoiser(width=width, blocks=blocks)  # CompVisCompat: loads state dicts with tables
        unchecked = CompVisLitDenoiser(width=width, blocks=blocks)
        unchecked.check_schedule_on_load = False

        fns = {
            "load": lambda: LitDenoiser.load_from_checkpoint(path, map_location="cpu"),
            "hook_checked": lambda: checked.on_load_checkpoint(ckpt),
            "hook_unchecked": lambda: unchecked.on_load_checkpoint(ckpt),
            "state_checked": lambda: checked.load_state_dict(dict(state_with_tables)),
            "state_unchecked": lambda: unchecked.load_state_dict(dict(state_with_tables)),
        }
        timing = interleaved(fns, cfg if cfg.quick else replace(cfg, rounds=min(cfg.rounds, 15)))
    m = timing.median
    fingerprint = max(m["hook_checked"] - m["hook_unchecked"], 0.0)
    tables_cost = max(m["state_checked"] - m["state_unchecked"], 0.0)
    ctx = (
        f"load_from_checkpoint {us(m['load'])}; on_load_checkpoint {us(m['hook_checked'])} checked vs "
        f"{us(m['hook_unchecked'])} unchecked; load_state_dict with {len(tables)} tables {us(m['state_checked'])} "
        f"checked vs {us(m['state_unchecked'])} unchecked"
    )
    case = f"LitDenoiser (ConvDenoiser width {width}, {blocks} blocks), checkpoint from Trainer.save_checkpoint"
    return [
        Result(
            "resume check",
            f"{case}: schedule fingerprint check (on_load_checkpoint), {us(fingerprint)}",
            "check time / load_from_checkpoint time, in %",
            100.0 * fingerprint / m["load"],
            GOAL,
            unit="%",
            context=ctx,
            extra={"median_s": m, "fingerprint_check_s": fingerprint},
            goal_note="negligible",
        ),
        Result(
            "resume check",
            f"{case}: table comparison for CompVis-style state dicts (load_state_dict), {us(tables_cost)}",
            "check time / load_from_checkpoint time, in %",
            100.0 * tables_cost / m["load"],
            None,
            unit="%",
            context=ctx + "; only state dicts that carry the tables pay it (each compared at its stored precision)",
            extra={"median_s": m, "table_check_s": tables_cost},
            goal_note="context (a one-off at load)",
        ),
    ]
