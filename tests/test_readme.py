"""The README's usage block is real code: run it as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    section = text.split("## Use it in a LightningModule", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "the README's usage section has no python block"
    return match.group(1)


def test_readme_usage_block_runs(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "usage.py"
    script.write_text(_usage_block())
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script), run_name="__readme__")
    model, trainer, samples = namespace["model"], namespace["trainer"], namespace["samples"]
    assert trainer.global_step == 20
    assert samples.shape == (4, 3, 16, 16) and torch.isfinite(samples).all()
    # bf16-mixed did not touch the tables; the checkpointing callback undid itself after fit
    assert model.alphas_cumprod.dtype == torch.float32
    assert model.block.forward.__func__ is type(model.block).forward
