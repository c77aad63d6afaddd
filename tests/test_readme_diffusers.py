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


def _latent_block() -> str:
    section = README.read_text().split("## Latent diffusion", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "the README's latent section has no python block"
    return match.group(1)


def test_readme_latent_block_trains_a_step_with_diffusers_models(tmp_path: Path) -> None:
    from tests.test_latent_diffusers import CTX, cond_unet, tiny_vae

    namespace = runpy.run_path(str(_write(tmp_path / "latent.py", _latent_block())), run_name="__readme__")
    model = namespace["LDM"](tiny_vae(), cond_unet())
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, "context": torch.randn(2, 3, CTX, generator=g)}
    model.train()
    loss = model.training_step(batch, 0)
    loss.backward()
    assert loss.ndim == 0 and bool(torch.isfinite(loss))
    assert model.first_stage.is_scale_fitted and model.first_stage.scale != 1.0  # scale_by_std fitted on the batch
    assert any(p.grad is not None for p in model.model.parameters())
    assert all(p.grad is None for p in model.first_stage.parameters())  # the first stage stays frozen
    optimizer = model.configure_optimizers()
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.model.parameters()
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
