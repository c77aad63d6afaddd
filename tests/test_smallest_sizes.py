"""Every public function at its smallest accepted sizes: finite numbers of the right shape, or a clear refusal.

The sizes: T = 2 (``timesteps=1`` is refused by the schedule config), one sample and an empty batch, ``dim`` 1 and 2,
one DDIM step, a one-entry schedule from the schedule makers, ``AlphaBlender`` with one frame, ``checkpoint``
without inputs, one timestep bucket. A size that is accepted must give finite, correctly shaped numbers (checked
against the formula where there is one); a size that is refused must raise ``ValueError``/``TypeError`` at the call,
with a message that names the argument, never an ``IndexError``/``RuntimeError`` from deep inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import lightning_ldm as ldm
from lightning_ldm import losses
from lightning_ldm.callbacks import DiffusionSeedCallback, TimestepLossMonitor
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import NoiseSchedule
from tests.lightning_helpers import TinyDenoiser, make_loader, make_trainer


def cosine_alpha_bar(x: float, s: float = 0.008) -> float:
    return math.cos((x + s) / (1 + s) * math.pi / 2) ** 2


def finite(value: Tensor | np.ndarray) -> bool:
    return bool(np.isfinite(value).all()) if isinstance(value, np.ndarray) else bool(torch.isfinite(value).all())


# ------------------------------------------------------------------------------------------- schedule makers
@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [1e-4]),  # linspace(√start, √end, 1)² = start
        ("sqrt_linear", [1e-4]),
        ("sqrt", [0.01]),  # linspace(start, end, 1)^0.5
        ("cosine", [0.999]),  # 1 − ā(1)/ā(0) = 1 − cos²(π/2)/ā(0) ≈ 1, clipped to 0.999
        ("squaredcos_cap_v2", [0.999]),
    ],
)
def test_make_beta_schedule_one_step(schedule: str, expected: list[float]) -> None:
    betas = ldm.make_beta_schedule(schedule, 1)
    assert betas.dtype == np.float64 and betas.shape == (1,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)


def test_make_beta_schedule_two_steps_golden() -> None:
    np.testing.assert_allclose(ldm.make_beta_schedule("linear", 2), [1e-4, 2e-2], rtol=1e-12)
    first = 1 - cosine_alpha_bar(0.5) / cosine_alpha_bar(0.0)
    np.testing.assert_allclose(ldm.make_beta_schedule("cosine", 2), [first, 0.999], rtol=1e-12)
    np.testing.assert_allclose(ldm.betas_for_alpha_bar(2, cosine_alpha_bar), [first, 0.999], rtol=1e-12)
    np.testing.assert_allclose(ldm.betas_for_alpha_bar(1, cosine_alpha_bar), [0.999], rtol=1e-12)


def test_schedule_tables_of_one_beta_are_finite() -> None:
    tables = ldm.schedule_tables(np.array([0.5]))
    assert all(v.shape == (1,) and finite(v) for v in tables.values())
    assert tables["alphas_cumprod"].tolist() == [0.5] and tables["alphas_cumprod_prev"].tolist() == [1.0]
    assert tables["posterior_variance"].tolist() == [0.0]  # β·(1 − ā_prev)/(1 − ā) with ā_prev = 1
    np.testing.assert_allclose(ldm.snr(np.array([0.5])), [1.0])
    assert ldm.snr(np.zeros(0)).shape == (0,) and ldm.log_snr(torch.zeros(0)).shape == (0,)


def test_rescale_zero_terminal_snr_two_betas() -> None:
    betas = ldm.rescale_zero_terminal_snr(np.array([0.1, 0.2]))
    assert betas.shape == (2,) and finite(betas)
    assert betas[-1] == 1.0  # ā_T = 0
    np.testing.assert_allclose(betas[0], 0.1, rtol=1e-12)  # the first ā is kept


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ldm.make_beta_schedule("linear", 0), ValueError, r"n_timestep=0 is out of range; expected an integer"),
        (
            lambda: ldm.betas_for_alpha_bar(0, cosine_alpha_bar),
            ValueError,
            r"num_diffusion_timesteps=0 is out of range",
        ),
        (lambda: ldm.rescale_zero_terminal_snr(np.array([0.5])), ValueError, r"needs at least 2 betas, got 1"),
        (lambda: ldm.schedule_tables(np.zeros(0)), ValueError, r"betas must be a 1-D array of at least 1"),
        (lambda: NoiseSchedule(timesteps=1), ValueError, r"timesteps=1 is out of range; expected an integer >= 2"),
        (lambda: NoiseSchedule(given_betas=[0.1]), ValueError, r"given_betas must be a 1-D array of at least 2"),
        (lambda: ldm.to_diffusers_config(timesteps=1), ValueError, r"timesteps=1 is out of range"),
        (
            lambda: NoiseSchedule.from_diffusers_config({"num_train_timesteps": 1}),
            ValueError,
            r"timesteps=1 is out of range",
        ),
    ],
)
def test_schedule_sizes_refused(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------- DDIM
AC2 = np.cumprod(1.0 - ldm.make_beta_schedule("linear", 2))  # [0.9999, 0.9999·0.98]


@pytest.mark.parametrize(
    ("method", "n", "T", "expected"),
    [
        ("uniform", 1, 2, [1]),
        ("quad", 1, 2, [1]),
        ("linspace", 1, 2, [0]),
        ("linspace", 2, 2, [0, 1]),
        ("trailing", 1, 2, [1]),
        ("trailing", 2, 2, [0, 1]),
        ("linspace", 1, 1, [0]),
        ("trailing", 1, 1, [0]),
    ],
)
def test_make_ddim_timesteps_smallest(method: str, n: int, T: int, expected: list[int]) -> None:  # noqa: N803
    steps = ldm.make_ddim_timesteps(method, n, T, verbose=False)
    assert steps.dtype == np.int64 and steps.tolist() == expected


@pytest.mark.parametrize("method", ["uniform", "quad"])
def test_make_ddim_timesteps_offset_methods_refuse_all_steps_of_two(method: str) -> None:
    with pytest.raises(ValueError, match=rf"ddim_discr_method='{method}' with num_ddim_timesteps=2 and T=2.*step at 2"):
        ldm.make_ddim_timesteps(method, 2, 2, verbose=False)
    with pytest.raises(ValueError, match=r"num_ddim_timesteps=0 is out of range; expected an integer in \[1, 2\]"):
        ldm.make_ddim_timesteps(method, 0, 2, verbose=False)


def test_make_ddim_sampling_parameters_one_step() -> None:
    sigmas, alphas, alphas_prev = ldm.make_ddim_sampling_parameters(AC2, np.array([1]), 1.0, verbose=False)
    np.testing.assert_allclose(alphas, [AC2[1]], rtol=1e-15)
    np.testing.assert_allclose(alphas_prev, [AC2[0]], rtol=1e-15)
    expected = math.sqrt((1 - AC2[0]) / (1 - AC2[1]) * (1 - AC2[1] / AC2[0]))
    np.testing.assert_allclose(sigmas, [expected], rtol=1e-12)
    with pytest.raises(ValueError, match=r"ddim_timesteps must be a non-empty 1-D array"):
        ldm.make_ddim_sampling_parameters(AC2, np.zeros(0, dtype=np.int64), 0.0, verbose=False)


def zero_eps(x: Tensor, t: Tensor) -> Tensor:
    return torch.zeros_like(x)


@pytest.mark.parametrize(("method", "step"), [("uniform", 1), ("quad", 1), ("linspace", 0), ("trailing", 1)])
@pytest.mark.parametrize("batch", [1, 0])
def test_ddim_sample_one_step_on_two_timesteps(method: str, step: int, batch: int) -> None:
    x_T = torch.linspace(-1, 1, 3 * batch).reshape(batch, 3)
    out = ldm.ddim_sample(zero_eps, x_T, AC2, num_steps=1, method=method)
    assert isinstance(out, Tensor) and out.shape == (batch, 3) and finite(out)
    # ε = 0: x0 = x/√ā_t, x_prev = √ā_prev·x0 with ā_prev = ā_0 (the first step's "previous" ā)
    torch.testing.assert_close(out.double(), x_T.double() * math.sqrt(AC2[0] / AC2[step]), rtol=1e-6, atol=0)


def test_ddim_sample_on_a_one_entry_table_and_step_count_errors() -> None:
    x_T = torch.ones(1, 2)
    out = ldm.ddim_sample(zero_eps, x_T, AC2[:1], num_steps=1, method="trailing")
    assert isinstance(out, Tensor) and torch.equal(out, x_T)  # ā_t = ā_prev: the identity
    with pytest.raises(ValueError, match=r"num_steps=0 is out of range; expected an integer in \[1, 2\]"):
        ldm.ddim_sample(zero_eps, x_T, AC2, num_steps=0)
    with pytest.raises(ValueError, match=r"num_steps=3 is out of range; expected an integer in \[1, 2\]"):
        ldm.ddim_sample(zero_eps, x_T, AC2, num_steps=3, method="linspace")


@pytest.mark.parametrize("batch", [1, 0])
def test_ddim_step_smallest(batch: int) -> None:
    x, eps = torch.full((batch,), 0.5), torch.full((batch,), 0.25)
    a, a_prev = 0.5, 0.9
    x_prev, x0 = ldm.ddim_step(x, eps, a, a_prev, 0.0)
    assert x_prev.shape == x0.shape == (batch,)
    want_x0 = (0.5 - math.sqrt(1 - a) * 0.25) / math.sqrt(a)
    torch.testing.assert_close(x0, torch.full((batch,), want_x0), rtol=1e-6, atol=0)
    want = math.sqrt(a_prev) * want_x0 + math.sqrt(1 - a_prev) * 0.25
    torch.testing.assert_close(x_prev, torch.full((batch,), want), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("batch", [1, 0])
def test_timestep_embedding_dim_one_and_two(batch: int) -> None:
    t = torch.full((batch,), 3)
    for embed in (lambda s, d: ldm.timestep_embedding(s, d), lambda s, d: ldm.SinusoidalTimestepEmbedding(d)(s)):
        assert torch.equal(embed(t, 1), torch.zeros(batch, 1))
        three = torch.tensor(3.0)
        want = torch.stack([torch.cos(three), torch.sin(three)]).expand(batch, 2)  # one frequency: f_0 = 1
        assert torch.equal(embed(t, 2), want)


# ------------------------------------------------------------------------------------- noising identities
S2 = NoiseSchedule(beta_schedule="linear", timesteps=2)
S2_64 = {name: torch.from_numpy(np.array(table)) for name, table in S2.tables_float64.items()}


@pytest.mark.parametrize("batch", [1, 0])
def test_noising_identities_smallest(batch: int) -> None:
    x, y = torch.full((batch, 2), 0.75), torch.full((batch, 2), -0.5)
    t = torch.ones(batch, dtype=torch.long)
    sa, sb = S2.table("sqrt_alphas_cumprod"), S2.table("sqrt_one_minus_alphas_cumprod")
    ra, rb = S2.table("sqrt_recip_alphas_cumprod"), S2.table("sqrt_recipm1_alphas_cumprod")
    a, b = S2_64["sqrt_alphas_cumprod"][1], S2_64["sqrt_one_minus_alphas_cumprod"][1]
    recip, recipm1 = S2_64["sqrt_recip_alphas_cumprod"][1], S2_64["sqrt_recipm1_alphas_cumprod"][1]
    cases = {
        "q_sample": (ldm.q_sample(x, t, y, sa, sb), a * 0.75 + b * -0.5),
        "get_v": (ldm.get_v(x, y, t, sa, sb), a * -0.5 - b * 0.75),
        "predict_start_from_noise": (ldm.predict_start_from_noise(x, t, y, ra, rb), recip * 0.75 - recipm1 * -0.5),
        "predict_start_from_v": (ldm.predict_start_from_v(x, t, y, sa, sb), a * 0.75 - b * -0.5),
        "predict_noise_from_v": (ldm.predict_noise_from_v(x, t, y, sa, sb), a * -0.5 + b * 0.75),
        "NoiseSchedule.q_sample": (S2.q_sample(x, t, y), a * 0.75 + b * -0.5),
        "NoiseSchedule.get_v": (S2.get_v(x, y, t), a * -0.5 - b * 0.75),
    }
    for name, (out, want) in cases.items():
        assert out.shape == (batch, 2) and out.dtype == torch.float32, name
        torch.testing.assert_close(out.double(), torch.full((batch, 2), float(want)).double(), rtol=1e-6, atol=0)
    mean, var, log_var = S2.q_posterior(x, y, t)
    assert mean.shape == (batch, 2) and var.shape == log_var.shape == (batch, 1)
    want_mean = S2_64["posterior_mean_coef1"][1] * 0.75 + S2_64["posterior_mean_coef2"][1] * -0.5
    torch.testing.assert_close(mean.double(), torch.full((batch, 2), float(want_mean)).double(), rtol=1e-6, atol=0)
    snr = S2.snr(t)
    assert snr.shape == (batch,)
    ab = S2_64["alphas_cumprod"][1]
    torch.testing.assert_close(snr.double(), torch.full((batch,), float(ab / (1 - ab))).double(), rtol=1e-6, atol=0)
    for weighting in ("min_snr", "vlb"):
        weights = S2.loss_weights(t, weighting)
        assert weights is not None and weights.shape == (batch,) and finite(weights)


def test_extract_mean_flat_noise_like_smallest() -> None:
    table = torch.tensor([0.25])
    assert torch.equal(ldm.extract_into_tensor(table, torch.tensor([0]), (1, 3, 4)), torch.full((1, 1, 1), 0.25))
    assert ldm.extract_into_tensor(table, torch.zeros(0, dtype=torch.long), (0, 3)).shape == (0, 1)
    assert torch.equal(ldm.mean_flat(torch.tensor([[1.0, 3.0]])), torch.tensor([2.0]))
    assert ldm.mean_flat(torch.zeros(0, 5)).shape == (0,) and ldm.mean_flat(torch.zeros(0, 0)).shape == (0,)
    with pytest.raises(ValueError, match=r"mean_flat needs samples of at least one element .* got \(1, 0\)"):
        ldm.mean_flat(torch.zeros(1, 0))
    for repeat in (False, True):
        assert ldm.noise_like((0, 2), "cpu", repeat=repeat).shape == (0, 2)
        one = ldm.noise_like((1, 2), "cpu", repeat=repeat)
        assert one.shape == (1, 2) and finite(one)
    assert ldm.noise_like((), "cpu").shape == ()
    with pytest.raises(ValueError, match=r"x_shape must have at least one dimension"):
        ldm.extract_into_tensor(table, torch.tensor([0]), ())


# ---------------------------------------------------------------------------- blending, checkpointing, metrics
@pytest.mark.parametrize("strategy", ["fixed", "learned", "learned_with_images"])
@pytest.mark.parametrize("batch", [1, 0])
def test_alpha_blender_one_frame(strategy: str, batch: int) -> None:
    blender = ldm.AlphaBlender(0.25, strategy)
    spatial, temporal = torch.full((batch, 2, 1, 1), 4.0), torch.full((batch, 2, 1, 1), 0.0)
    indicator = torch.zeros(batch, 1)  # B clips of T = 1 frame, flattened into the batch
    out = blender(spatial, temporal, indicator if strategy == "learned_with_images" else None)
    alpha = 0.25 if strategy == "fixed" else 1 / (1 + math.exp(-0.25))
    assert out.shape == (batch, 2, 1, 1)
    torch.testing.assert_close(out, torch.full((batch, 2, 1, 1), 4.0 * alpha), rtol=1e-6, atol=0)
    if strategy == "learned_with_images":  # a still image takes the spatial branch only
        assert torch.equal(blender(spatial, temporal, torch.ones(batch, 1)), spatial)


@pytest.mark.parametrize(("flag", "reentrant"), [(True, True), (True, False), (False, True)])
def test_checkpoint_without_inputs(flag: bool, reentrant: bool) -> None:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    out = ldm.checkpoint(lambda: (lin.weight**2).sum(), (), list(lin.parameters()), flag, use_reentrant=reentrant)
    assert out.shape == () and float(out) == 30.0
    out.backward()
    assert lin.weight.grad is not None and torch.equal(lin.weight.grad, 2 * lin.weight.detach())


def test_checkpoint_empty_batch() -> None:
    lin = nn.Linear(2, 3)
    x = torch.zeros(0, 2, requires_grad=True)
    out = ldm.checkpoint(lin, (x,), list(lin.parameters()), True)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 2)
    assert lin.weight.grad is not None and torch.equal(lin.weight.grad, torch.zeros(3, 2))


def test_timestep_bucket_loss_one_timestep() -> None:
    metric = ldm.TimestepBucketLoss(1, num_buckets=1)
    assert metric.compute().isnan().tolist() == [True]  # no sample yet: NaN, as documented
    metric.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    metric.update(torch.tensor([0, 0]), torch.tensor([2.0, 3.0]))
    assert metric.compute().tolist() == [2.5]
    with pytest.raises(ValueError, match=r"num_buckets=10 is out of range; expected an integer in \[1, 1\]"):
        ldm.TimestepBucketLoss(1)
    with pytest.raises(ValueError, match=r"num_timesteps=0 is out of range; expected an integer >= 1"):
        ldm.TimestepBucketLoss(0, num_buckets=1)


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize(
    "sampler", [ldm.UniformSampler(), ldm.LogitNormalSampler(), ldm.LossAwareSampler(history_per_term=1)]
)
@pytest.mark.parametrize("num_timesteps", [2, 1])
def test_samplers_smallest(sampler: ldm.TimestepSampler, num_timesteps: int) -> None:
    if isinstance(sampler, ldm.LossAwareSampler):
        sampler = ldm.LossAwareSampler(history_per_term=1)  # its history is sized by the first T it sees
    generator = torch.Generator().manual_seed(0)
    t = sampler.sample(64, num_timesteps, "cpu", generator)
    assert t.shape == (64,) and t.dtype == torch.long
    assert set(t.tolist()) <= set(range(num_timesteps))
    assert sampler.sample(0, num_timesteps, "cpu", generator).shape == (0,)
    probabilities = getattr(sampler, "probabilities", None)
    if probabilities is not None:
        p = probabilities(num_timesteps)
        assert p.shape == (num_timesteps,) and finite(p) and float(p.sum()) == pytest.approx(1.0, abs=1e-12)


def test_loss_aware_sampler_warms_up_on_two_timesteps() -> None:
    sampler = ldm.LossAwareSampler(history_per_term=1, uniform_prob=0.0)
    with pytest.raises(ValueError, match=r"LossAwareSampler.update\(\) before the number of timesteps is known"):
        sampler.update(torch.tensor([0]), torch.tensor([1.0]))
    sampler.prepare(2)
    sampler.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    assert sampler.warmed_up
    # p_t ∝ √(E[loss_t²]) = (1, 3)
    torch.testing.assert_close(sampler.probabilities(2).double(), torch.tensor([0.25, 0.75], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ DiffusionMixin
class Tiny(DiffusionMixin, L.LightningModule):
    def __init__(self, **schedule: Any) -> None:
        super().__init__()
        self.register_schedule(**schedule)
        self.lin = nn.Linear(2, 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.lin(x)


class ZeroPredictor(Tiny):
    """A network that predicts zeros: its loss is the mean square of the target."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


EMPTY = torch.zeros(0, 2)
SCHEDULES_T2 = [
    {"timesteps": 2},
    {"timesteps": 2, "parameterization": "x0", "beta_schedule": "cosine"},
    {"timesteps": 2, "parameterization": "v", "zero_terminal_snr": True},
    {"given_betas": [0.1, 0.2], "parameterization": "v"},
]


@pytest.mark.parametrize("schedule", SCHEDULES_T2, ids=str)
def test_mixin_on_two_timesteps(schedule: dict[str, Any]) -> None:
    model = Tiny(**schedule)
    ns = model.noise_schedule
    assert ns is not None
    assert ns.num_timesteps == 2 and ns.table("alphas_cumprod").shape == (2,) and finite(ns.table("lvlb_weights"))
    x = torch.full((1, 2), 0.5)
    for weighting in ("none", "min_snr", "vlb"):
        loss = model.diffusion_loss(x, loss_weighting=weighting)
        assert loss.shape == () and finite(loss)
    # a model that predicts zeros: the loss is the mean square of the target
    t, noise = torch.tensor([1]), torch.full((1, 2), 2.0)
    target = {"eps": noise, "x0": x, "v": ns.get_v(x, noise, t)}[ns.parameterization]
    loss = ZeroPredictor(**schedule).diffusion_loss(x, t=t, noise=noise)
    torch.testing.assert_close(loss, target.square().mean())
    assert ns.q_sample(x, t, model.draw_noise(x)).shape == (1, 2)
    assert model.draw_timesteps(0).shape == (0,) and set(model.draw_timesteps(32).tolist()) <= {0, 1}
    assert torch.equal(ldm.timestep_embedding(torch.tensor([0, 1]), 1), torch.zeros(2, 1))
    for method in ("uniform", "linspace", "trailing"):
        sample = model.sample((1, 2), num_steps=1, method=method)
        assert isinstance(sample, Tensor) and sample.shape == (1, 2) and finite(sample)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.diffusion_loss(torch.zeros(0, 2)), r"x_start must hold at least one sample .* shape \(0, 2\)"),
        (lambda m: m.diffusion_loss(torch.zeros(1, 0)), r"x_start must hold at least one sample .* shape \(1, 0\)"),
        (
            lambda m: m.diffusion_loss(torch.zeros(0, 2), t=torch.zeros(0, dtype=torch.long), noise=torch.zeros(0, 2)),
            r"x_start must hold at least one sample",
        ),
        (
            lambda m: m.sample((0, 2), num_steps=1),
            r"shape must start with a positive batch size, got \(0, 2\)",
        ),
        (
            lambda m: m.sample((1, 2), num_steps=0),
            r"num_steps=0 is out of range; expected an integer in \[1, 2\]",
        ),
        (lambda m: m.register_schedule(timesteps=1), r"timesteps=1 is out of range; expected an integer >= 2"),
        (lambda m: m.register_schedule(given_betas=[0.5]), r"given_betas must be a 1-D array of at least 2"),
        (lambda m: ldm.timestep_embedding(torch.tensor([0]), 0), r"dim=0 is out of range; expected an integer >= 1"),
    ],
)
def test_mixin_sizes_refused(call: Callable[[Tiny], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(Tiny(timesteps=2))


def test_losses_refuse_an_empty_batch_before_calling_the_model() -> None:
    calls: list[Tensor] = []
    with pytest.raises(ValueError, match=r"x_start must hold at least one sample"):
        losses.diffusion_loss(
            lambda x, t: calls.append(x) or x,
            S2,
            torch.zeros(0, 2),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 2),
        )
    assert calls == []


@pytest.mark.parametrize("sampler", ["uniform", "loss_aware", "logit_normal"])
def test_fit_on_two_timesteps_with_batch_one(sampler: str) -> None:
    model = TinyDenoiser(timesteps=2)
    monitor = TimestepLossMonitor(num_buckets=2, log_every_n_steps=1)
    trainer = make_trainer(max_steps=3, callbacks=[DiffusionSeedCallback(timestep_sampler=sampler, seed=0), monitor])
    trainer.fit(model, make_loader(n=3, batch_size=1))
    assert trainer.global_step == 3 and len(model.recorded) == 3
    for t, per_sample in model.recorded:
        assert t.shape == per_sample.shape == (1,) and int(t) in (0, 1) and finite(per_sample)
    sample = model.sample((1, 8), num_steps=1, method="trailing")
    assert isinstance(sample, Tensor) and sample.shape == (1, 8) and finite(sample)


def test_loss_monitor_refuses_more_buckets_than_timesteps_at_fit_start() -> None:
    trainer = make_trainer(max_steps=1, callbacks=[DiffusionSeedCallback(seed=0), TimestepLossMonitor(num_buckets=3)])
    with pytest.raises(ValueError, match=r"num_buckets=3 is larger than the schedule's 2 timesteps"):
        trainer.fit(TinyDenoiser(timesteps=2), make_loader(n=2, batch_size=1))
