"""The README's usage block is real code: run it as written."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import types
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
    assert model.noise_schedule.table("alphas_cumprod").dtype == torch.float32
    assert model.block.forward.__func__ is type(model.block).forward


def _plain_block() -> str:
    section = README.read_text().split("## Without Lightning", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, "the README's plain-PyTorch section has no python block"
    return match.group(1)


BLOCK_LIGHTNING = """
import sys
import types


class _NoLightning:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, _NoLightning())
"""


def test_readme_plain_pytorch_block_runs_where_lightning_cannot_be_imported(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    check = (
        "\nassert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
        "\nassert step == 19 and loss.item() == loss.item()\n"
    )
    script.write_text(BLOCK_LIGHTNING + _plain_block() + check)
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"step 19: loss \d+\.\d{4}\n", done.stdout), done.stdout
    blocked = subprocess.run(
        [sys.executable, "-c", BLOCK_LIGHTNING + "import lightning"], env=env, capture_output=True, text=True
    )
    assert "ImportError: lightning is blocked" in blocked.stderr  # the guard itself works


def test_readme_condition_dropout_snippet_draws_from_the_diffusion_generator() -> None:
    snippet = re.search(r"`(g = self\.diffusion_generator; drop = [^`]+)`", README.read_text())
    assert snippet is not None, "the README's condition-dropout snippet is gone"
    y = torch.arange(1000)

    def run(generator: torch.Generator | None) -> torch.Tensor:
        namespace = {"self": types.SimpleNamespace(diffusion_generator=generator), "torch": torch, "y": y}
        exec(snippet.group(1), namespace)
        return namespace["drop"]

    drop = run(torch.Generator().manual_seed(3))
    assert torch.equal(drop, torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.1)
    assert 0.07 < float(drop.float().mean()) < 0.13
    torch.manual_seed(5)
    assert torch.equal(run(None), torch.rand(1000, generator=torch.Generator().manual_seed(5)) < 0.1)  # global RNG
