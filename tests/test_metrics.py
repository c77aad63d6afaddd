"""TimestepBucketLoss: per-bucket means against a NumPy reference, one bucket, NaN kept, copies and pickles."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.callbacks import DiffusionSeedCallback, TimestepLossMonitor
from lightning_ldm.metrics import TimestepBucketLoss, bucket_bounds
from tests.lightning_helpers import TinyDenoiser, make_loader, make_trainer


def numpy_bucket_means(t: np.ndarray, losses: np.ndarray, num_timesteps: int, num_buckets: int) -> np.ndarray:
    """Independent reference: bucket by the inclusive ranges ⌈b·T/n⌉ … ⌈(b+1)·T/n⌉ − 1, mean in float64."""
    out = np.full(num_buckets, np.nan)
    for b in range(num_buckets):
        lo, hi = math.ceil(b * num_timesteps / num_buckets), math.ceil((b + 1) * num_timesteps / num_buckets) - 1
        sel = (t >= lo) & (t <= hi)
        if sel.any():
            out[b] = losses[sel].astype(np.float64).mean()
    return out


def test_one_bucket_is_one_dimensional_with_the_mean_of_everything():
    metric = TimestepBucketLoss(num_timesteps=20, num_buckets=1)
    with pytest.warns(UserWarning, match="was called before the ``update`` method"):
        empty = metric.compute()
    assert empty.shape == (1,) and math.isnan(empty.item())  # nothing seen yet
    metric.update(torch.tensor([0, 5, 19]), torch.tensor([1.0, 2.0, 6.0]))
    metric.update(torch.tensor([7]), torch.tensor([3.0]))
    got = metric.compute()
    assert got.shape == (1,) and got.dtype == torch.float64
    assert got.tolist() == [3.0]  # (1 + 2 + 6 + 3) / 4
    assert list(got.tolist()) == [3.0]  # iterable, as DiffusionSeedCallback iterates it
    assert metric.names() == ["loss_bucket/00-19"]


def test_one_bucket_forward_and_one_timestep():
    metric = TimestepBucketLoss(num_timesteps=1, num_buckets=1)
    batch = metric(torch.tensor([0, 0]), torch.tensor([2.0, 4.0]))  # forward: this batch's value
    assert batch.shape == (1,) and batch.tolist() == [3.0]
    assert metric.compute().shape == (1,)


@pytest.mark.parametrize("num_buckets", [1, 2, 3, 7])
def test_compute_is_one_dimensional_after_copy_and_pickle(num_buckets):
    metric = TimestepBucketLoss(num_timesteps=7, num_buckets=num_buckets)
    metric.update(torch.arange(7), torch.arange(7, dtype=torch.float32))
    expected = numpy_bucket_means(np.arange(7), np.arange(7.0), 7, num_buckets)
    for m in (metric, copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
        got = m.compute()
        assert got.shape == (num_buckets,)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_nan_loss_makes_its_bucket_nan_and_leaves_the_others():
    metric = TimestepBucketLoss(num_timesteps=10, num_buckets=2)
    metric.update(torch.tensor([0, 1, 7, 8]), torch.tensor([1.0, float("nan"), 2.0, 4.0]))
    got = metric.compute()
    assert math.isnan(got[0].item()) and got[1].item() == 3.0
    # more finite losses do not wash the NaN out
    metric.update(torch.tensor([2, 3]), torch.tensor([5.0, 6.0]))
    assert math.isnan(metric.compute()[0].item())


def test_nan_with_one_bucket_and_infinities():
    metric = TimestepBucketLoss(num_timesteps=10, num_buckets=1)
    metric.update(torch.tensor([3]), torch.tensor([float("nan")]))
    got = metric.compute()
    assert got.shape == (1,) and math.isnan(got.item())
    inf = TimestepBucketLoss(num_timesteps=10, num_buckets=2)
    inf.update(torch.tensor([0, 9, 9]), torch.tensor([float("inf"), float("inf"), -float("inf")]))
    first, second = inf.compute().tolist()
    assert first == math.inf and math.isnan(second)  # inf − inf is NaN


def test_empty_bucket_is_nan_not_zero():
    metric = TimestepBucketLoss(num_timesteps=10, num_buckets=5)
    metric.update(torch.tensor([0, 9]), torch.tensor([1.5, 2.5]))
    got = metric.compute().tolist()
    assert got[0] == 1.5 and got[4] == 2.5 and all(math.isnan(v) for v in got[1:4])


@settings(max_examples=60, deadline=None)
@given(
    num_timesteps=st.integers(1, 60),
    data=st.data(),
)
def test_matches_numpy_reference(num_timesteps, data):
    num_buckets = data.draw(st.integers(1, num_timesteps))
    size = data.draw(st.integers(0, 40))
    t = np.array(data.draw(st.lists(st.integers(0, num_timesteps - 1), min_size=size, max_size=size)), dtype=np.int64)
    finite = st.floats(-1e3, 1e3, allow_nan=False, width=32, allow_subnormal=False)
    losses = np.array(data.draw(st.lists(finite | st.just(float("nan")), min_size=size, max_size=size)), np.float32)
    metric = TimestepBucketLoss(num_timesteps, num_buckets)
    half = size // 2
    metric.update(torch.from_numpy(t[:half]), torch.from_numpy(losses[:half]))
    metric.update(torch.from_numpy(t[half:]), torch.from_numpy(losses[half:]))
    got = metric.compute().numpy()
    assert got.shape == (num_buckets,)
    np.testing.assert_allclose(got, numpy_bucket_means(t, losses, num_timesteps, num_buckets), rtol=1e-12, atol=0)
    assert len(bucket_bounds(num_timesteps, num_buckets)) == num_buckets


def test_mismatched_entries_refused():
    metric = TimestepBucketLoss(num_timesteps=10, num_buckets=1)
    with pytest.raises(ValueError, match=r"t and losses must have the same number of entries, got 2 and 3"):
        metric.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))


def test_loss_monitor_with_one_bucket_fits_and_logs_the_overall_mean():
    model = TinyDenoiser(timesteps=20)
    callbacks = [DiffusionSeedCallback(seed=0), TimestepLossMonitor(num_buckets=1)]
    trainer = make_trainer(max_epochs=1, max_steps=-1, callbacks=callbacks)
    trainer.fit(model, make_loader())
    losses = torch.cat([r[1] for r in model.recorded]).double()
    assert float(trainer.callback_metrics["loss_bucket/00-19"]) == pytest.approx(float(losses.mean()), rel=1e-6)
