"""DiffusionSeedCallback with Lightning's EMAWeightAveraging: EMA weights, exact schedule tables, checkpoint/resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from torch import Tensor

from lightning_ldm.callbacks import DiffusionSeedCallback
from lightning_ldm.noise_schedule import SCHEDULE_TABLES
from tests.lightning_helpers import CompVisTinyDenoiser, make_loader, make_trainer

DECAY = 0.9
N = 8


class _Watch(CompVisTinyDenoiser):
    """Records the live weights after every optimizer step and the tables (CompVis' names) that validation sees."""

    def __init__(self) -> None:
        super().__init__(timesteps=20)
        self.exact = self.tables()
        self.steps: list[list[Tensor]] = []
        self.val_tables_exact: list[bool] = []

    def tables(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).clone() for name in SCHEDULE_TABLES}

    def tables_exact(self) -> bool:
        return all(torch.equal(t, self.exact[n]) and t.dtype == torch.float32 for n, t in self.tables().items())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append([p.detach().clone() for p in self.parameters()])

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.val_tables_exact.append(self.tables_exact())
        return super().validation_step(batch, batch_idx)


class _LiveAtTrainEnd(Callback):
    """Placed before EMAWeightAveraging: sees the live weights before EMA copies the average into the module."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.live = [p.detach().clone() for p in pl_module.parameters()]


def _ema(**kwargs: Any) -> EMAWeightAveraging:
    return EMAWeightAveraging(decay=DECAY, **kwargs)


def test_ema_weights_and_exact_tables() -> None:
    model, live, ema = _Watch(), _LiveAtTrainEnd(), _ema()
    trainer = make_trainer(max_steps=N, callbacks=[DiffusionSeedCallback(seed=0), live, ema], check_val_every_n_epoch=1)
    trainer.fit(model, make_loader(), make_loader(n=8))

    # the EMA the callback kept, against an EMA computed here from the recorded live weights (float64)
    expected = [w.double() for w in model.steps[0]]
    for weights in model.steps[1:]:
        expected = [DECAY * e + (1 - DECAY) * w.double() for e, w in zip(expected, weights, strict=True)]
    averaged = list(ema._average_model.module.parameters())  # type: ignore[union-attr]
    for a, e in zip(averaged, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-7)
    # after fit the module holds the EMA weights, which differ from the live weights of the last step
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), averaged, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(live.live, model.steps[-1], strict=True))
    assert max(float((p - a.detach()).abs().max()) for p, a in zip(live.live, averaged, strict=True)) > 1e-4

    # the schedule tables: exact float32 during validation (EMA swaps its averaged buffers in) and after fit
    assert model.val_tables_exact and all(model.val_tables_exact)
    assert model.tables_exact()


def test_ema_alone_cannot_reach_the_tables() -> None:
    """EMA averages every buffer; the tables are not buffers, so its average cannot touch them."""
    model = _Watch()
    ema = EMAWeightAveraging(decay=0.9)
    make_trainer(max_steps=N, callbacks=[ema]).fit(model, make_loader())
    averaged = ema._average_model.module  # type: ignore[union-attr]
    assert not set(SCHEDULE_TABLES) & {name for name, _ in averaged.named_buffers()}
    assert model.tables_exact()
    assert averaged.noise_schedule.fingerprint == model.noise_schedule.fingerprint


class _CrashAt(Callback):
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 4:
            raise RuntimeError("crash")


def test_ema_checkpoint_and_resume(tmp_path: Path) -> None:
    def run(callbacks: list[Callback], ckpt_path: str | None = None) -> tuple[_Watch, EMAWeightAveraging]:
        model, ema = _Watch(), _ema()
        cbs = [DiffusionSeedCallback(seed=1), ema, *callbacks]
        trainer = make_trainer(max_steps=N, callbacks=cbs, enable_checkpointing=bool(callbacks))
        trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
        return model, ema

    a, _ = run([])
    with pytest.raises(RuntimeError, match="crash"):
        run([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, filename="{step}"), _CrashAt()])
    b, _ = run([], ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert len(b.steps) == N - 4
    for x, y in zip(a.steps[-1], b.steps[-1], strict=True):  # live weights of the last step
        assert torch.equal(x, y)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):  # EMA weights (in the module after fit)
        assert torch.equal(x, y)
    assert b.tables_exact()
