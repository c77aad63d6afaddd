"""Crash-and-resume equivalence, and a schedule mismatch refused on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks import ScheduleCallback
from tests.lightning_helpers import TinyDenoiser, make_loader, make_trainer

N = 8  # total optimizer steps; 4 batches per epoch


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def _schedule_cb() -> ScheduleCallback:
    # loss-aware with a short history: warmed up within the first steps, so its state matters after the resume
    return ScheduleCallback(seed=21, sampler="loss_aware", loss_aware_history=1, log_every_n_steps=3)


def _fit(loader: DataLoader, callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any) -> TinyDenoiser:
    model = TinyDenoiser(timesteps=20)
    trainer = make_trainer(max_steps=N, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model


def _crash_and_resume(tmp_path: Path, loader: DataLoader, k: int) -> tuple[TinyDenoiser, ScheduleCallback]:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match=f"simulated crash at step {k}"):
        _fit(loader, [_schedule_cb(), ckpt, _CrashAt(k)], enable_checkpointing=True)
    path = tmp_path / f"step={k}.ckpt"
    assert path.exists()
    cb = _schedule_cb()
    return _fit(loader, [cb], ckpt_path=str(path)), cb


def _compare(a: TinyDenoiser, cb_a: ScheduleCallback, b: TinyDenoiser, cb_b: ScheduleCallback, k: int) -> float:
    diff = max(
        float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)), diff
    # the resumed run drew exactly the timesteps of steps k..N-1 of the uninterrupted run, and saw the same losses
    assert len(b.recorded) == N - k
    for (ta, la), (tb, lb) in zip(a.recorded[k:], b.recorded, strict=True):
        assert torch.equal(ta, tb) and torch.equal(la, lb)
    sa, sb = cb_a.state_dict(), cb_b.state_dict()
    assert sa["batch_counter"] == sb["batch_counter"] == N
    assert sa["seed"] == sb["seed"] == 21
    assert torch.equal(sa["sampler"]["loss_history"], sb["sampler"]["loss_history"])
    assert torch.equal(sa["sampler"]["loss_counts"], sb["sampler"]["loss_counts"])
    assert torch.equal(sa["bucket_loss"]["loss_sum"], sb["bucket_loss"]["loss_sum"])
    assert torch.equal(sa["bucket_loss"]["count"], sb["bucket_loss"]["count"])
    return diff


def test_crash_and_resume_at_epoch_end_is_exact(tmp_path: Path) -> None:
    loader = make_loader()  # 32 samples, batch 8: 4 batches per epoch, fixed order
    cb_a = _schedule_cb()
    uninterrupted = _fit(loader, [cb_a])
    resumed, cb_b = _crash_and_resume(tmp_path, loader, k=4)
    assert cb_b.sampler.warmed_up  # type: ignore[attr-defined]
    diff = _compare(uninterrupted, cb_a, resumed, cb_b, k=4)
    print(f"resume at step 4 (epoch end): max |weight diff| = {diff}")


def test_crash_and_resume_mid_epoch_is_exact_for_the_callback_state(tmp_path: Path) -> None:
    # Lightning restarts a plain DataLoader at its first batch when resuming mid-epoch; with every batch equal the
    # data cannot differ, so the comparison isolates what the callback controls (t, noise, sampler, bucket window).
    rows = torch.randn(1, 8, generator=torch.Generator().manual_seed(0)).repeat(32, 1)
    loader = DataLoader(TensorDataset(rows), batch_size=8, shuffle=False)
    cb_a = _schedule_cb()
    uninterrupted = _fit(loader, [cb_a])
    resumed, cb_b = _crash_and_resume(tmp_path, loader, k=2)
    diff = _compare(uninterrupted, cb_a, resumed, cb_b, k=2)
    print(f"resume at step 2 (mid-epoch): max |weight diff| = {diff}")


def test_resume_with_a_different_schedule_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = make_trainer(max_steps=2, callbacks=[ScheduleCallback(seed=0), ckpt], enable_checkpointing=True)
    trainer.fit(TinyDenoiser(timesteps=20), make_loader())
    other = TinyDenoiser(timesteps=20, beta_schedule="cosine")
    with pytest.raises(
        ValueError, match=r"different noise schedule.*beta_schedule: checkpoint 'linear', model 'cosine'"
    ):
        make_trainer(max_steps=4, callbacks=[ScheduleCallback(seed=0)]).fit(
            other, make_loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )
    # the same schedule resumes
    same = TinyDenoiser(timesteps=20)
    make_trainer(max_steps=3, callbacks=[ScheduleCallback(seed=0)]).fit(
        same, make_loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert len(same.recorded) == 1
