"""Timestep samplers: exact draws for a seeded generator, distributions from independent formulas, state, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.metrics import TimestepBucketLoss, bucket_bounds, bucket_names
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, TimestepSampler, UniformSampler


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- uniform
def test_uniform_is_randint_of_the_generator() -> None:
    t = UniformSampler().sample(64, 1000, "cpu", _gen(3))
    expected = torch.randint(0, 1000, (64,), generator=_gen(3))
    assert t.dtype == torch.long and t.shape == (64,)
    assert torch.equal(t, expected)
    assert UniformSampler().importance_weights(t, 1000) is None
    assert UniformSampler().state_dict() == {}


def test_uniform_covers_range_evenly() -> None:
    t = UniformSampler().sample(100_000, 10, None, _gen(0))
    freq = torch.bincount(t, minlength=10).double() / t.numel()
    assert int(t.min()) == 0 and int(t.max()) == 9
    assert (freq - 0.1).abs().max() < 0.005  # 5 sigma is ~0.0047


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": -1, "num_timesteps": 10}, ValueError, "batch_size=-1"),
        ({"batch_size": 4, "num_timesteps": 0}, ValueError, "num_timesteps=0"),
        ({"batch_size": 2.0, "num_timesteps": 10}, TypeError, "batch_size must be an integer"),
    ],
)
def test_uniform_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        UniformSampler().sample(**kwargs)


def test_base_class_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        TimestepSampler().sample(2, 10)


# -------------------------------------------------------------------------------------------------- logit-normal
def _logit_normal_probs(n_steps: int, m: float, s: float) -> np.ndarray:
    """P(t = k) = Φ((logit((k+1)/T) − m)/s) − Φ((logit(k/T) − m)/s), in plain Python."""

    def phi_of_edge(k: int) -> float:
        if k == 0:
            return 0.0
        if k == n_steps:
            return 1.0
        u = k / n_steps
        z = (math.log(u / (1 - u)) - m) / s
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    return np.array([phi_of_edge(k + 1) - phi_of_edge(k) for k in range(n_steps)])


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.7), (-1.0, 2.0)])
def test_logit_normal_probabilities_formula(mean: float, std: float) -> None:
    sampler = LogitNormalSampler(mean, std)
    p = sampler.probabilities(50).numpy()
    np.testing.assert_allclose(p, _logit_normal_probs(50, mean, std), rtol=1e-12, atol=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 0.5)])
def test_logit_normal_empirical_distribution(mean: float, std: float) -> None:
    T, n = 20, 200_000
    t = LogitNormalSampler(mean, std).sample(n, T, "cpu", _gen(1))
    freq = torch.bincount(t, minlength=T).double().numpy() / n
    expected = _logit_normal_probs(T, mean, std)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-6)


def test_logit_normal_mapping_of_the_same_normals() -> None:
    """t = floor(sigmoid(m + s·n)·T), clamped to T − 1, for the normals the generator gives (numpy float64 check)."""
    T, mean, std = 1000, 0.3, 1.2
    t = LogitNormalSampler(mean, std).sample(4096, T, "cpu", _gen(7)).numpy()
    normals = torch.randn(4096, generator=_gen(7), dtype=torch.float32).double().numpy()
    expected = np.minimum(np.floor(T / (1 + np.exp(-(mean + std * normals)))), T - 1).astype(np.int64)
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() <= T - 1
    # float32 sigmoid vs float64: a draw may land on the other side of a bin edge, by at most one step
    assert np.abs(t - expected).max() <= 1
    assert np.mean(t == expected) > 0.999


def test_logit_normal_extreme_draws_stay_in_range() -> None:
    t = LogitNormalSampler(mean=30.0, std=0.1).sample(256, 10, "cpu", _gen(0))
    assert torch.equal(t, torch.full((256,), 9))  # u rounds to 1.0 in float32: clamped to T − 1
    t = LogitNormalSampler(mean=-30.0, std=0.1).sample(256, 10, "cpu", _gen(0))
    assert torch.equal(t, torch.zeros(256, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"std": 0.0}, ValueError, r"std=0 is out of range"),
        ({"std": -1.0}, ValueError, r"std=-1 is out of range"),
        ({"mean": float("nan")}, ValueError, "mean=nan must be finite"),
        ({"mean": "0"}, TypeError, "mean must be a real number"),
    ],
)
def test_logit_normal_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LogitNormalSampler(**kwargs)


# ---------------------------------------------------------------------------------------------------- loss-aware
class _ReferenceSecondMoment:
    """improved-diffusion's LossSecondMomentResampler, re-typed in numpy from its description."""

    def __init__(self, n_steps: int, history: int, uniform_prob: float) -> None:
        self.history = np.zeros((n_steps, history))
        self.counts = np.zeros(n_steps, dtype=int)
        self.h, self.eps, self.T = history, uniform_prob, n_steps

    def update(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses, strict=True):
            if self.counts[t] == self.h:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1

    def weights(self) -> np.ndarray:
        if not (self.counts == self.h).all():
            return np.ones(self.T) / self.T
        w = np.sqrt(np.mean(self.history**2, axis=-1))
        w = w / w.sum() * (1 - self.eps) + self.eps / self.T
        return w / w.sum()


def test_loss_aware_matches_reference_and_is_uniform_before_warm_up() -> None:
    T, h = 12, 3
    sampler, ref = LossAwareSampler(history_per_term=h, uniform_prob=0.05), _ReferenceSecondMoment(T, h, 0.05)
    rng = np.random.default_rng(0)
    gen_seed = 0
    while not sampler.warmed_up:
        # before warm-up: the very same draw as UniformSampler
        assert torch.equal(
            sampler.sample(8, T, "cpu", _gen(gen_seed)), UniformSampler().sample(8, T, "cpu", _gen(gen_seed))
        )
        np.testing.assert_allclose(sampler.probabilities(T).numpy(), np.full(T, 1 / T))
        ts = rng.integers(0, T, size=8)
        losses = rng.random(8) * (1 + ts)  # later timesteps: larger losses
        sampler.update(torch.from_numpy(ts), torch.from_numpy(losses))
        ref.update(ts.tolist(), losses.tolist())
        gen_seed += 1
    for _ in range(5):  # keep updating past the history length: oldest losses drop out
        ts = rng.integers(0, T, size=16)
        losses = rng.random(16) * (1 + ts)
        sampler.update(torch.from_numpy(ts), torch.from_numpy(losses).float())
        ref.update(ts.tolist(), torch.from_numpy(losses).float().double().tolist())
    p = sampler.probabilities(T).numpy()
    np.testing.assert_allclose(p, ref.weights(), rtol=1e-12)
    np.testing.assert_allclose(sampler._loss_history.numpy(), ref.history, rtol=0)

    # draws follow p (multinomial with the generator)
    n = 100_000
    t = sampler.sample(n, T, "cpu", _gen(5))
    freq = torch.bincount(t, minlength=T).double().numpy() / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-6)
    assert torch.equal(t, sampler.sample(n, T, "cpu", _gen(5)))

    # importance weights 1/(T p(t)) make the weighted loss unbiased for uniform t
    iw = sampler.importance_weights(torch.arange(T), T).double().numpy()
    np.testing.assert_allclose(iw, 1.0 / (T * p), rtol=1e-6)
    per_t_loss = rng.random(T)
    assert float(np.sum(p * iw * per_t_loss)) == pytest.approx(float(per_t_loss.mean()), rel=1e-6)


def test_loss_aware_repeated_timestep_in_one_batch_keeps_order() -> None:
    sampler = LossAwareSampler(history_per_term=2)
    sampler.prepare(3)
    sampler.update(torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert sampler._loss_history[1].tolist() == [2.0, 3.0]
    assert sampler._loss_counts.tolist() == [0, 2, 0]


@settings(max_examples=40, deadline=None)
@given(
    losses=st.lists(st.floats(0.0, 1e3, allow_nan=False, allow_subnormal=False), min_size=6, max_size=6),
    uniform_prob=st.floats(0.0, 1.0, allow_subnormal=False),
)
def test_loss_aware_probabilities_are_a_distribution(losses: list[float], uniform_prob: float) -> None:
    sampler = LossAwareSampler(history_per_term=1, uniform_prob=uniform_prob)
    sampler.prepare(6)
    sampler.update(torch.arange(6), torch.tensor(losses, dtype=torch.float64))
    p = sampler.probabilities(6)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    assert bool((p >= uniform_prob / 6 - 1e-12).all())


def test_loss_aware_state_round_trip() -> None:
    sampler = LossAwareSampler(history_per_term=2, uniform_prob=0.1)
    sampler.prepare(5)
    sampler.update(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 2]), torch.arange(11).double() + 1)
    state = sampler.state_dict()
    clone = LossAwareSampler(history_per_term=2, uniform_prob=0.1)
    clone.load_state_dict(state)
    assert clone.warmed_up
    assert torch.equal(clone.probabilities(5), sampler.probabilities(5))
    assert torch.equal(clone.sample(32, 5, "cpu", _gen(2)), sampler.sample(32, 5, "cpu", _gen(2)))
    # the state is a copy: later updates do not leak into it
    sampler.update(torch.tensor([4]), torch.tensor([100.0]))
    assert not torch.equal(state["loss_history"], sampler.state_dict()["loss_history"])
    fresh = LossAwareSampler(history_per_term=2)
    fresh.load_state_dict(LossAwareSampler(history_per_term=2).state_dict())  # an empty state loads too
    assert not fresh.warmed_up


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"history_per_term": 0}, ValueError, "history_per_term=0 is out of range"),
        ({"history_per_term": 1.5}, TypeError, "history_per_term must be an integer"),
        ({"uniform_prob": 1.5}, ValueError, r"uniform_prob=1.5 is out of range; expected a number in \[0, 1\]"),
    ],
)
def test_loss_aware_bad_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LossAwareSampler(**kwargs)


def test_loss_aware_bad_use() -> None:
    sampler = LossAwareSampler(history_per_term=2)
    with pytest.raises(ValueError, match=r"before the number of timesteps is known; call prepare\(T\)"):
        sampler.update(torch.tensor([0]), torch.tensor([1.0]))
    sampler.prepare(4)
    with pytest.raises(ValueError, match="num_timesteps=5 differs from the 4 timesteps"):
        sampler.sample(2, 5)
    with pytest.raises(ValueError, match="same number of entries, got 2 and 1"):
        sampler.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        sampler.update(torch.tensor([4]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="losses must be finite"):
        sampler.update(torch.tensor([1]), torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="saved history_per_term=3 differs"):
        sampler.load_state_dict(LossAwareSampler(history_per_term=3).state_dict())
    with pytest.raises(KeyError, match="missing"):
        sampler.load_state_dict({"num_timesteps": 4})
    bad = sampler.state_dict()
    bad["loss_counts"] = torch.zeros(7, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match num_timesteps=4"):
        sampler.load_state_dict(bad)


# ------------------------------------------------------------------------------------------- loss-by-bucket metric
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bucket_bounds_tile_the_range(data: st.DataObject) -> None:
    T = data.draw(st.integers(1, 2000))
    n = data.draw(st.integers(1, min(T, 64)))
    bounds = bucket_bounds(T, n)
    assert bounds[0][0] == 0 and bounds[-1][1] == T - 1
    assert all(lo <= hi for lo, hi in bounds)
    assert all(b[1] + 1 == c[0] for b, c in itertools.pairwise(bounds))
    metric = TimestepBucketLoss(T, n)
    t = torch.arange(T)
    b = metric.bucket_of(t)
    for k, (lo, hi) in enumerate(bounds):
        assert bool((b[lo : hi + 1] == k).all())


def test_bucket_names_are_zero_padded() -> None:
    assert bucket_names(1000, 10)[:2] == ["loss_bucket/000-099", "loss_bucket/100-199"]
    assert bucket_names(1000, 10)[-1] == "loss_bucket/900-999"
    assert bucket_names(20, 3) == ["loss_bucket/00-06", "loss_bucket/07-13", "loss_bucket/14-19"]


def test_bucket_metric_means_and_empty_buckets() -> None:
    rng = np.random.default_rng(1)
    metric = TimestepBucketLoss(100, 4)
    ts, ls = [], []
    for _ in range(3):
        t = rng.integers(0, 75, size=10)  # bucket 3 (75..99) stays empty
        loss = rng.random(10)
        metric.update(torch.from_numpy(t), torch.from_numpy(loss).float())
        ts.append(t)
        ls.append(torch.from_numpy(loss).float().double().numpy())
    t_all, l_all = np.concatenate(ts), np.concatenate(ls)
    out = metric.compute().numpy()
    for k in range(3):
        sel = (t_all >= 25 * k) & (t_all < 25 * (k + 1))
        assert out[k] == pytest.approx(l_all[sel].mean(), rel=1e-12)
    assert math.isnan(out[3])


def test_bucket_metric_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_buckets=11 is out of range; expected an integer in \[1, 10\]"):
        TimestepBucketLoss(10, 11)
    with pytest.raises(ValueError, match="same number of entries, got 2 and 3"):
        TimestepBucketLoss(10, 2).update(torch.tensor([0, 1]), torch.zeros(3))
