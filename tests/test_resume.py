"""Crash-and-resume equivalence, and a schedule mismatch refused on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks import DiffusionSeedCallback, TimestepLossMonitor
from lightning_ldm.timestep_samplers import LossAwareSampler
from tests.lightning_helpers import RecordingLogger, TinyDenoiser, make_loader, make_trainer

N = 8  # total optimizer steps; 4 batches per epoch


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def _schedule_cbs() -> tuple[DiffusionSeedCallback, TimestepLossMonitor]:
    # loss-aware with a short history: warmed up within the first steps, so its state matters after the resume;
    # bucket windows of 3 steps: the window open at the crash is in the checkpoint
    return DiffusionSeedCallback(LossAwareSampler(history_per_term=1), seed=21), TimestepLossMonitor(
        log_every_n_steps=3
    )


def _fit(loader: DataLoader, callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any) -> TinyDenoiser:
    model = TinyDenoiser(timesteps=20)
    trainer = make_trainer(max_steps=N, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model


Callbacks = tuple[DiffusionSeedCallback, TimestepLossMonitor]


def _crash_and_resume(tmp_path: Path, loader: DataLoader, k: int) -> tuple[TinyDenoiser, Callbacks, RecordingLogger]:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match=f"simulated crash at step {k}"):
        _fit(loader, [*_schedule_cbs(), ckpt, _CrashAt(k)], enable_checkpointing=True)
    path = tmp_path / f"step={k}.ckpt"
    assert path.exists()
    cbs, logger = _schedule_cbs(), RecordingLogger()
    return _fit(loader, [*cbs], ckpt_path=str(path), logger=logger), cbs, logger


def _windows(logger: RecordingLogger) -> dict[int | None, dict[str, float]]:
    return {step: m for m, step in logger.records if any(name.startswith("loss_bucket/") for name in m)}


def _compare_windows(a: RecordingLogger, b: RecordingLogger, k: int) -> None:
    """The resumed run logs the windows after step k with the values of the uninterrupted run (bit for bit)."""
    windows_a, windows_b = _windows(a), _windows(b)
    assert sorted(windows_a) == [3, 6]
    assert sorted(windows_b) == [step for step in (3, 6) if step > k]
    for step, logged in windows_b.items():
        assert logged == windows_a[step], step


def _compare(a: TinyDenoiser, cbs_a: Callbacks, b: TinyDenoiser, cbs_b: Callbacks, k: int) -> float:
    diff = max(
        float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)), diff
    # the resumed run drew exactly the timesteps of steps k..N-1 of the uninterrupted run, and saw the same losses
    assert len(b.recorded) == N - k
    for (ta, la), (tb, lb) in zip(a.recorded[k:], b.recorded, strict=True):
        assert torch.equal(ta, tb) and torch.equal(la, lb)
    sa, sb = cbs_a[0].state_dict(), cbs_b[0].state_dict()
    assert sa["batch_counter"] == sb["batch_counter"] == N
    assert sa["seed"] == sb["seed"] == 21
    assert torch.equal(sa["sampler"]["loss_history"], sb["sampler"]["loss_history"])
    assert torch.equal(sa["sampler"]["loss_counts"], sb["sampler"]["loss_counts"])
    ma, mb = cbs_a[1].state_dict(), cbs_b[1].state_dict()
    assert ma["last_log_step"] == mb["last_log_step"] == 6
    # the window open at the end (steps 7 and 8) holds the same sums: the resumed run restored the saved window
    assert int(ma["bucket_loss"]["count"].sum()) == 2 * 8
    assert torch.equal(ma["bucket_loss"]["loss_sum"], mb["bucket_loss"]["loss_sum"])
    assert torch.equal(ma["bucket_loss"]["count"], mb["bucket_loss"]["count"])
    return diff


def test_crash_and_resume_at_epoch_end_is_exact(tmp_path: Path) -> None:
    loader = make_loader()  # 32 samples, batch 8: 4 batches per epoch, fixed order
    cbs_a, log_a = _schedule_cbs(), RecordingLogger()
    uninterrupted = _fit(loader, [*cbs_a], logger=log_a)
    resumed, cbs_b, log_b = _crash_and_resume(tmp_path, loader, k=4)
    _compare_windows(log_a, log_b, k=4)  # the window of steps 4-6 spans the crash
    assert cbs_b[0].sampler.warmed_up  # type: ignore[attr-defined]
    diff = _compare(uninterrupted, cbs_a, resumed, cbs_b, k=4)
    print(f"resume at step 4 (epoch end): max |weight diff| = {diff}")


def test_crash_and_resume_mid_epoch_is_exact_for_the_callback_state(tmp_path: Path) -> None:
    # Lightning restarts a plain DataLoader at its first batch when resuming mid-epoch; with every batch equal the
    # data cannot differ, so the comparison isolates what the callback controls (t, noise, sampler, bucket window).
    rows = torch.randn(1, 8, generator=torch.Generator().manual_seed(0)).repeat(32, 1)
    loader = DataLoader(TensorDataset(rows), batch_size=8, shuffle=False)
    cbs_a, log_a = _schedule_cbs(), RecordingLogger()
    uninterrupted = _fit(loader, [*cbs_a], logger=log_a)
    resumed, cbs_b, log_b = _crash_and_resume(tmp_path, loader, k=2)
    _compare_windows(log_a, log_b, k=2)  # the window of steps 1-3 spans the crash
    diff = _compare(uninterrupted, cbs_a, resumed, cbs_b, k=2)
    print(f"resume at step 2 (mid-epoch): max |weight diff| = {diff}")


def test_resume_with_a_different_schedule_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = make_trainer(max_steps=2, callbacks=[DiffusionSeedCallback(seed=0), ckpt], enable_checkpointing=True)
    trainer.fit(TinyDenoiser(timesteps=20), make_loader())
    other = TinyDenoiser(timesteps=20, beta_schedule="cosine")
    with pytest.raises(
        ValueError, match=r"different noise schedule.*beta_schedule: checkpoint 'linear', model 'cosine'"
    ):
        make_trainer(max_steps=4, callbacks=[DiffusionSeedCallback(seed=0)]).fit(
            other, make_loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )
    # the same schedule resumes
    same = TinyDenoiser(timesteps=20)
    make_trainer(max_steps=3, callbacks=[DiffusionSeedCallback(seed=0)]).fit(
        same, make_loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert len(same.recorded) == 1
