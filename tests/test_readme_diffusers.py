"""The README's export block is real code: train, export, reload with diffusers' pipeline, compare (run as written)."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def _export_block() -> str:
    section = README.read_text().split("### Out to diffusers and back", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "the README's export section has no python block"
    return match.group(1)


def test_readme_export_block_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    script = tmp_path / "export.py"
    script.write_text(_export_block())
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script), run_name="__readme__")
    assert capsys.readouterr().out.strip().splitlines()[-1] == "True"
    model, trainer, pipe, path = namespace["model"], namespace["trainer"], namespace["pipe"], namespace["path"]
    assert trainer.global_step == 30
    assert isinstance(pipe, StableDiffusionPipeline)
    assert sorted(p.name for p in Path(path).iterdir()) == ["model_index.json", "scheduler", "unet", "vae"]
    fitted = model.first_stage.scale
    assert fitted != 1.0 and json.loads((Path(path) / "vae" / "config.json").read_text())["scaling_factor"] == fitted
    ours, theirs = namespace["ours"], namespace["theirs"]
    assert torch.equal(theirs, (ours / 2 + 0.5).clamp(0, 1)) and float(theirs.std()) > 0.01
