"""TimestepLossMonitor: loss by timestep bucket (means, windows, NaN, resume state) and the log-SNR curve artifact."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn

from lightning_ldm.callbacks import DiffusionSeedCallback, TimestepLossMonitor
from tests.lightning_helpers import RecordingLogger, TinyDenoiser, make_loader, make_trainer

T = 20
B = 8


def _linear_log_snr(n_steps: int, start: float = 1e-4, end: float = 2e-2) -> np.ndarray:
    betas = np.linspace(start**0.5, end**0.5, n_steps) ** 2
    abar = np.cumprod(1 - betas)
    return np.log(abar / (1 - abar))


def _bucket_means(recorded: list[tuple[Tensor, Tensor]], n_steps: int, n: int) -> dict[str, float]:
    """Mean recorded loss per non-empty bucket ``[⌈b·T/n⌉, ⌈(b + 1)·T/n⌉ − 1]`` (NaN when a loss in it is NaN)."""
    t = torch.cat([r[0] for r in recorded]).numpy()
    loss = torch.cat([r[1] for r in recorded]).double().numpy()
    width = len(str(n_steps - 1))
    out = {}
    for b in range(n):
        lo, hi = math.ceil(b * n_steps / n), math.ceil((b + 1) * n_steps / n) - 1
        sel = (t >= lo) & (t <= hi)
        if sel.any():
            out[f"loss_bucket/{lo:0{width}d}-{hi:0{width}d}"] = float(loss[sel].mean())
    return out


def _assert_same(logged: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(logged) == sorted(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(logged[name]), name
        else:
            assert logged[name] == pytest.approx(value, rel=1e-6), name


# ============================================================================================= arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_buckets": 0}, ValueError, r"num_buckets=0 is out of range; expected an integer >= 1"),
        ({"num_buckets": 2.5}, TypeError, "num_buckets must be an integer, got 2.5 of type float"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps=0 is out of range"),
        ({"log_schedule": "yes"}, TypeError, "log_schedule must be a bool, got 'yes' of type str"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TimestepLossMonitor(**kwargs)


@pytest.mark.parametrize("flag", [np.True_, np.False_])
def test_log_schedule_accepts_a_numpy_bool(flag: np.bool_) -> None:
    assert TimestepLossMonitor(log_schedule=flag).log_schedule is bool(flag)  # type: ignore[arg-type]


def test_refuses_more_buckets_than_timesteps() -> None:
    with pytest.raises(ValueError, match=r"num_buckets=50 is larger than the schedule's 20 timesteps; expected an in"):
        make_trainer(callbacks=[TimestepLossMonitor(num_buckets=50)]).fit(TinyDenoiser(timesteps=T), make_loader())


# ============================================================================================ bucket means
def test_loss_by_bucket_logged_per_epoch() -> None:
    model = TinyDenoiser(timesteps=T)
    trainer = make_trainer(
        max_epochs=1, max_steps=-1, callbacks=[DiffusionSeedCallback(seed=0), TimestepLossMonitor(num_buckets=3)]
    )
    trainer.fit(model, make_loader())
    expected = _bucket_means(model.recorded, T, 3)
    assert sorted(expected) == ["loss_bucket/00-06", "loss_bucket/07-13", "loss_bucket/14-19"]
    for name, value in expected.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value, rel=1e-6)


def test_loss_by_bucket_logged_every_n_steps_and_no_curve_rows() -> None:
    logger = RecordingLogger()
    model = TinyDenoiser(timesteps=T)
    monitor = TimestepLossMonitor(log_every_n_steps=2)
    trainer = make_trainer(max_steps=4, logger=logger, callbacks=[monitor, DiffusionSeedCallback(seed=0)])
    trainer.fit(model, make_loader())
    windows = [(step, m) for m, step in logger.records if any(k.startswith("loss_bucket/") for k in m)]
    assert [step for step, _ in windows] == [2, 4]
    for (_, logged), batches in zip(windows, (model.recorded[0:2], model.recorded[2:4]), strict=True):
        _assert_same(logged, _bucket_means(batches, T, 10))
    # the curve is an artifact, never metric rows: this logger has no directory, so it gets nothing
    assert all(not any(k.startswith("schedule/") for k in m) for m, _ in logger.records)
    assert monitor.log_snr is not None and monitor.log_snr.dtype == torch.float64
    np.testing.assert_allclose(monitor.log_snr.numpy(), _linear_log_snr(T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("log_every_n_steps", [None, 2])
def test_one_bucket_is_the_mean_of_every_loss(log_every_n_steps: int | None) -> None:
    logger = RecordingLogger()
    model = TinyDenoiser(timesteps=T)
    monitor = TimestepLossMonitor(num_buckets=1, log_every_n_steps=log_every_n_steps)
    trainer = make_trainer(max_epochs=1, max_steps=-1, logger=logger, callbacks=[monitor])  # no DiffusionSeedCallback
    trainer.fit(model, make_loader())
    everything = float(torch.cat([loss for _, loss in model.recorded]).double().mean())
    if log_every_n_steps is None:
        assert float(trainer.callback_metrics["loss_bucket/00-19"]) == pytest.approx(everything, rel=1e-6)
    else:
        windows = logger.series("loss_bucket/00-19")
        assert [step for step, _ in windows] == [2, 4]
        halves = [float(torch.cat([x for _, x in model.recorded[i : i + 2]]).double().mean()) for i in (0, 2)]
        assert [v for _, v in windows] == pytest.approx(halves, rel=1e-6)
        assert sum(halves) / 2 == pytest.approx(everything, rel=1e-6)


class _Sometimes(TinyDenoiser):
    """Calls diffusion_loss on even batches only (odd batches train on a plain regression loss)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if batch_idx % 2 == 0:
            return super().training_step(batch, batch_idx)
        return self.net(batch[0], torch.zeros(batch[0].shape[0], dtype=torch.long)).square().mean()


def test_a_batch_without_diffusion_loss_adds_nothing() -> None:
    model = _Sometimes(timesteps=T)
    monitor = TimestepLossMonitor(num_buckets=2)
    trainer = make_trainer(max_epochs=1, max_steps=-1, callbacks=[monitor, DiffusionSeedCallback(seed=0)])
    trainer.fit(model, make_loader())
    assert len(model.recorded) == 2  # batches 0 and 2
    for name, value in _bucket_means(model.recorded, T, 2).items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value, rel=1e-6)


# ===================================================================================================== NaN
class _NaNFrom(nn.Module):
    """Wraps a denoiser; while ``poison`` is set, the first sample's output (and so its loss and gradient) is NaN."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.poison = False

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.inner(x, t)
        if self.poison:
            first = torch.arange(out.shape[0], device=out.device) == 0
            out = out + torch.where(first, math.nan, 0.0)[:, None]
        return out


class _Diverging(TinyDenoiser):
    def __init__(self, poison_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = _NaNFrom(self.net)
        self.poison_step = poison_step

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.net.poison = self.global_step == self.poison_step
        return super().training_step(batch, batch_idx)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_nan_losses_are_logged_as_nan_and_empty_buckets_are_left_out(tmp_path: Path) -> None:
    model = _Diverging(poison_step=1, timesteps=T)
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = TimestepLossMonitor(num_buckets=10, log_every_n_steps=1, log_schedule=False)
    trainer = make_trainer(
        max_steps=4, logger=logger, log_every_n_steps=1, callbacks=[monitor, DiffusionSeedCallback()]
    )
    with pytest.warns(UserWarning, match=r"TimestepLossMonitor: the mean training loss is NaN in loss_bucket/\d\d-"):
        trainer.fit(model, make_loader())
    rows = _read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for row, batch in zip(rows, model.recorded, strict=True):
        logged = {k: float(v) for k, v in row.items() if k.startswith("loss_bucket/") and v != ""}
        _assert_same(logged, _bucket_means([batch], T, 10))  # empty buckets: blank cells
        assert len(logged) < 10  # 8 samples cannot fill 10 buckets: the blanks are really there
    nan_per_step = [sum(math.isnan(v) for v in _bucket_means([b], T, 10).values()) for b in model.recorded]
    # step 1 finite; step 2 one NaN sample, one NaN bucket; then the weights are NaN and every bucket is NaN
    assert nan_per_step[0] == 0 and nan_per_step[1] == 1
    assert nan_per_step[2:] == [len(_bucket_means([b], T, 10)) for b in model.recorded[2:]]
    assert not all(torch.isfinite(p).all() for p in model.parameters())


# ============================================================================================= schedule curve
def _check_curve_csv(path: Path, log_snr: Tensor | None) -> None:
    rows = _read_csv(path)
    assert [int(r["t"]) for r in rows] == list(range(T))
    written = [float(r["log_snr"]) for r in rows]
    assert log_snr is not None and written == log_snr.tolist()  # float64, exact round trip
    np.testing.assert_allclose(written, _linear_log_snr(T), rtol=1e-6, atol=1e-6)


def test_curve_with_a_csv_logger_is_a_png_and_a_csv_file(tmp_path: Path) -> None:
    from matplotlib.image import imread

    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = TimestepLossMonitor(log_every_n_steps=1)
    trainer = make_trainer(
        max_steps=4, logger=logger, log_every_n_steps=1, callbacks=[DiffusionSeedCallback(), monitor]
    )
    trainer.fit(TinyDenoiser(timesteps=T), make_loader())
    run = tmp_path / "run" / "version_0"
    _check_curve_csv(run / "log_snr.csv", monitor.log_snr)
    image = imread(run / "log_snr.png")
    assert image.shape[:2] == (350, 500)  # 5 x 3.5 inches at 100 dpi
    assert float(image[..., :3].std()) > 0.05  # something is drawn
    rows = _read_csv(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # training steps only: no rows with step = t
    assert not any(name.startswith("schedule/") for name in rows[0])


def test_curve_with_tensorboard_is_a_figure(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = TimestepLossMonitor(log_every_n_steps=1)
    trainer = make_trainer(
        max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[DiffusionSeedCallback(), monitor]
    )
    trainer.fit(TinyDenoiser(timesteps=T), make_loader())
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Images("schedule/log_snr")
    assert [(e.step, e.width, e.height) for e in images] == [(0, 500, 350)]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = events.Tags()["scalars"]
    assert not any(tag.startswith("schedule/") for tag in scalars)
    steps = {e.step for tag in scalars if tag.startswith("loss_bucket/") for e in events.Scalars(tag)}
    assert steps == {1, 2, 3}  # the bucket windows, at training steps
    _check_curve_csv(Path(logger.log_dir) / "log_snr.csv", monitor.log_snr)


def test_no_curve_when_disabled(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = TimestepLossMonitor(log_schedule=False)
    make_trainer(max_steps=1, logger=logger, callbacks=[monitor]).fit(TinyDenoiser(timesteps=T), make_loader())
    run = tmp_path / "run" / "version_0"
    assert not (run / "log_snr.csv").exists() and not (run / "log_snr.png").exists()
    assert monitor.log_snr is not None and monitor.log_snr.shape == (T,)


class _CurveToList(TimestepLossMonitor):
    def __init__(self) -> None:
        super().__init__()
        self.curves: list[list[float]] = []

    def write_schedule_curve(self, trainer: Any, log_snr: Tensor) -> None:
        self.curves.append(log_snr.tolist())


def test_curve_destination_is_overridable() -> None:
    monitor = _CurveToList()
    make_trainer(max_steps=1, callbacks=[monitor]).fit(TinyDenoiser(timesteps=T, beta_schedule="cosine"), make_loader())
    assert len(monitor.curves) == 1 and len(monitor.curves[0]) == T
    assert monitor.curves[0] == sorted(monitor.curves[0], reverse=True)  # log-SNR falls with t


# ================================================================================================= state
def test_state_dict_round_trip_and_other_num_buckets_on_resume() -> None:
    monitor = TimestepLossMonitor(num_buckets=4, log_every_n_steps=3)
    model = TinyDenoiser(timesteps=T)
    make_trainer(max_steps=4, callbacks=[monitor]).fit(model, make_loader())
    state = monitor.state_dict()
    assert state["last_log_step"] == 3
    assert int(state["bucket_loss"]["count"].sum()) == B  # the open window: step 4
    fresh = TimestepLossMonitor(num_buckets=2, log_every_n_steps=3)
    fresh.load_state_dict(state)
    with pytest.warns(UserWarning, match="bucket window has another num_buckets; not restored"):
        make_trainer(max_steps=1, callbacks=[fresh]).fit(TinyDenoiser(timesteps=T), make_loader())


# ================================================== reuse for a second fit (issue 13, point 8), resume kept
def test_a_reused_monitor_starts_each_fit_with_an_empty_window() -> None:
    monitor = TimestepLossMonitor(num_buckets=4, log_every_n_steps=2)
    first = TinyDenoiser(timesteps=T)
    make_trainer(max_steps=3, callbacks=[monitor, DiffusionSeedCallback(seed=0)]).fit(first, make_loader())
    assert monitor.state_dict()["last_log_step"] == 2  # step 3's losses are left in the open window
    logger = RecordingLogger()
    second = TinyDenoiser(timesteps=T)
    make_trainer(max_steps=2, logger=logger, callbacks=[monitor, DiffusionSeedCallback(seed=1)]).fit(
        second, make_loader()
    )
    windows = [(step, m) for m, step in logger.records if any(k.startswith("loss_bucket/") for k in m)]
    assert [step for step, _ in windows] == [2]  # dropped before: step 2 was "logged already" in the first fit
    _assert_same(windows[0][1], _bucket_means(second.recorded, T, 4))  # without the first fit's step 3


def test_a_reused_monitor_resuming_from_a_checkpoint_keeps_the_restored_window(tmp_path: Path) -> None:
    monitor = TimestepLossMonitor(num_buckets=4, log_every_n_steps=2)
    first = TinyDenoiser(timesteps=T)
    trainer = make_trainer(max_steps=3, callbacks=[monitor, DiffusionSeedCallback(seed=0)])
    trainer.fit(first, make_loader())
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    logger = RecordingLogger()
    resumed = TinyDenoiser(timesteps=T)
    trainer = make_trainer(max_steps=4, logger=logger, callbacks=[monitor, DiffusionSeedCallback(seed=0)])
    trainer.fit(resumed, make_loader(), ckpt_path=tmp_path / "step3.ckpt")
    windows = [(step, m) for m, step in logger.records if any(k.startswith("loss_bucket/") for k in m)]
    assert [step for step, _ in windows] == [4]
    _assert_same(windows[0][1], _bucket_means([first.recorded[2], resumed.recorded[0]], T, 4))  # steps 3 and 4
