"""The denoising loss core: min-SNR weights, the target of each parameterization, diffusion_loss and its errors.

Expected numbers are computed here in float64 from the schedule's float64 tables and the formulas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_ldm.losses import LOSS_TYPES, diffusion_loss
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.parameterization import LOSS_WEIGHTINGS, min_snr_weights, prediction_target

T = 50


def data(batch: int = 4, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g)
    noise = torch.randn(batch, *shape, generator=g)
    t = torch.randint(0, T, (batch,), generator=g)
    return x0, noise, t


def abar(schedule: NoiseSchedule, t: Tensor) -> np.ndarray:
    return schedule.tables_float64["alphas_cumprod"][t.numpy()]


def per_sample_shape(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape(-1, *([1] * (ndim - 1)))


class Recorder(nn.Module):
    """Returns a fixed output (float64-exact numbers) and records what it was called with."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output
        self.calls: list[tuple[Tensor, Tensor, dict[str, Any]]] = []

    def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.calls.append((x_t, t, kwargs))
        return self.output


# ------------------------------------------------------------------------------------------------ min_snr_weights
@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=1, max_size=16),
    st.floats(0.1, 20.0, allow_subnormal=False),
    st.sampled_from(["eps", "x0", "v"]),
)
def test_min_snr_weights_follow_the_formulas(snr: list[float], gamma: float, parameterization: str) -> None:
    s = torch.tensor(snr, dtype=torch.float64)
    weights = min_snr_weights(s, gamma, parameterization)
    assert weights.dtype == torch.float64 and weights.shape == s.shape
    for value, weight in zip(snr, weights.tolist(), strict=True):
        if value == 0:
            expected = 1.0  # the terminal step of a zero-terminal-SNR schedule still trains
        elif parameterization == "eps":
            expected = gamma / max(value, gamma)
        elif parameterization == "x0":
            expected = min(value, gamma)
        else:
            expected = min(value, gamma) / (value + 1)
        assert weight == pytest.approx(expected, rel=1e-12, abs=0)
    if parameterization == "eps":
        assert bool((weights <= 1).all())  # min(s, γ)/s never up-weights


def test_min_snr_weights_keep_float32() -> None:
    s = torch.tensor([0.0, 0.5, 5.0, 50.0])
    for parameterization, expected in [
        ("eps", [1.0, 1.0, 1.0, 0.1]),
        ("x0", [1.0, 0.5, 5.0, 5.0]),
        ("v", [1.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]),
    ]:
        weights = min_snr_weights(s, 5.0, parameterization)
        assert weights.dtype == torch.float32
        torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------------------------ prediction_target
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_prediction_target_of_each_parameterization(parameterization: str) -> None:
    schedule = NoiseSchedule(timesteps=T, parameterization=parameterization)
    x0, noise, t = data()
    a_table, b_table = schedule.table("sqrt_alphas_cumprod"), schedule.table("sqrt_one_minus_alphas_cumprod")
    target = prediction_target(parameterization, x0, noise, t, a_table, b_table)
    if parameterization == "eps":
        assert target is noise
    elif parameterization == "x0":
        assert target is x0
    else:
        a = per_sample_shape(abar(schedule, t), 3)
        expected = np.sqrt(a) * noise.double().numpy() - np.sqrt(1 - a) * x0.double().numpy()
        np.testing.assert_allclose(target.double().numpy(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(target, schedule.get_v(x0, noise, t))


# ------------------------------------------------------------------------------------------------ diffusion_loss
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("loss_weighting", LOSS_WEIGHTINGS)
def test_loss_is_the_weighted_error_of_the_target(parameterization: str, loss_type: str, loss_weighting: str) -> None:
    schedule = NoiseSchedule(beta_schedule="cosine", timesteps=T, parameterization=parameterization)
    x0, noise, t = data()
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    model = Recorder(output)
    loss, per_sample = diffusion_loss(
        model, schedule, x0, t, noise, loss_type=loss_type, loss_weighting=loss_weighting, min_snr_gamma=2.0
    )
    # the model saw q_sample(x0, t, noise) and t
    (x_t, seen_t, kwargs), *_ = model.calls
    assert len(model.calls) == 1 and kwargs == {} and torch.equal(seen_t, t)
    a = per_sample_shape(abar(schedule, t), 3)
    np.testing.assert_allclose(
        x_t.double().numpy(),
        np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    # the target, the error and its per-sample mean, in float64
    target = {
        "eps": noise.double().numpy(),
        "x0": x0.double().numpy(),
        "v": np.sqrt(a) * noise.double().numpy() - np.sqrt(1 - a) * x0.double().numpy(),
    }[parameterization]
    error = output.double().numpy() - target
    expected = (error**2 if loss_type == "l2" else np.abs(error)).reshape(4, -1).mean(axis=1)
    snr = schedule.tables_float64["snr_table"][t.numpy()]
    if loss_weighting == "min_snr":
        expected = expected * {"eps": 2.0 / np.maximum(snr, 2.0), "x0": np.minimum(snr, 2.0)}.get(
            parameterization, np.minimum(snr, 2.0) / (snr + 1)
        )
    elif loss_weighting == "vlb":
        expected = expected * schedule.tables_float64["lvlb_weights"][t.numpy()]
    assert per_sample.dtype == loss.dtype == torch.float32 and per_sample.shape == (4,) and loss.shape == ()
    np.testing.assert_allclose(per_sample.double().numpy(), expected, rtol=2e-6)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=2e-6)


def test_importance_weights_scale_the_mean_only() -> None:
    schedule = NoiseSchedule(timesteps=T)
    x0, noise, t = data()
    model = Recorder(torch.zeros_like(x0))
    plain, per_sample = diffusion_loss(model, schedule, x0, t, noise)
    importance = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    weighted, weighted_per_sample = diffusion_loss(model, schedule, x0, t, noise, importance_weights=importance)
    assert torch.equal(weighted_per_sample, per_sample)  # the per-sample losses stay unscaled (for monitors)
    assert weighted.dtype == torch.float32
    torch.testing.assert_close(weighted, (per_sample * importance.float()).mean())
    assert float(plain) == pytest.approx(float((noise.square()).mean()), rel=1e-6)


def test_model_kwargs_are_passed_through() -> None:
    schedule = NoiseSchedule(timesteps=T)
    x0, noise, t = data()
    model = Recorder(torch.zeros_like(x0))
    context = torch.ones(4, 7)
    diffusion_loss(model, schedule, x0, t, noise, model_kwargs={"context": context, "flag": True})
    assert model.calls[0][2]["context"] is context and model.calls[0][2]["flag"] is True


def test_loss_reduction_is_float32_under_bf16_autocast_on_cpu() -> None:
    schedule = NoiseSchedule(timesteps=T, parameterization="v")
    x0, noise, t = data(shape=(6,))
    torch.manual_seed(0)
    linear = nn.Linear(6, 6)
    outputs: list[Tensor] = []

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        out = linear(x_t)
        outputs.append(out)
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_sample = diffusion_loss(model, schedule, x0, t, noise, loss_weighting="min_snr")
    assert outputs[0].dtype == torch.bfloat16  # the model ran in bf16 ...
    assert loss.dtype == per_sample.dtype == torch.float32  # ... the loss did not
    target = schedule.get_v(x0, noise, t)
    weights = schedule.loss_weights(t, "min_snr")
    assert weights is not None
    expected = (outputs[0].float() - target).square().mean(dim=1) * weights
    assert torch.equal(per_sample, expected)
    loss.backward()
    assert linear.weight.grad is not None and linear.weight.grad.dtype == torch.float32


def test_half_model_outputs_give_a_float32_loss() -> None:
    schedule = NoiseSchedule(timesteps=T)
    x0, noise, t = data()
    half = Recorder(torch.full(x0.shape, 0.1, dtype=torch.float16))
    loss, per_sample = diffusion_loss(half, schedule, x0.half(), t, noise.half())
    assert loss.dtype == per_sample.dtype == torch.float32
    expected = (torch.full(x0.shape, 0.1, dtype=torch.float16).float() - noise.half().float()).square()
    assert torch.equal(per_sample, expected.mean(dim=(1, 2)))


BAD_CALLS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    (
        "loss_type",
        {"loss_type": "huber"},
        ValueError,
        r"loss_type='huber' is not supported; expected one of 'l2', 'l1'",
    ),
    (
        "loss_weighting",
        {"loss_weighting": "snr"},
        ValueError,
        r"loss_weighting='snr' is not supported; expected one of 'none', 'min_snr', 'vlb'",
    ),
    (
        "gamma",
        {"min_snr_gamma": -1.0},
        ValueError,
        r"min_snr_gamma=-1 is out of range; expected a number in \(0, inf\]",
    ),
    (
        "x_start int",
        {"x_start": torch.ones(4, 2, 3, dtype=torch.long)},
        TypeError,
        r"x_start must be a floating tensor",
    ),
    (
        "x_start 0-d",
        {"x_start": torch.tensor(1.0), "noise": torch.tensor(1.0)},
        ValueError,
        r"x_start must have a batch",
    ),
    (
        "noise",
        {"noise": torch.randn(4, 3, 2)},
        ValueError,
        r"x_start and noise must have the same shape, got \(4, 2, 3\)",
    ),
    ("noise list", {"noise": [0.0] * 4}, TypeError, r"noise must be a torch.Tensor, got list"),
    ("t float", {"t": torch.zeros(4)}, TypeError, r"t must hold integer timesteps .* got dtype torch.float32"),
    ("t batch", {"t": torch.zeros(3, dtype=torch.long)}, ValueError, r"t has 3 timesteps but x_start has batch size 4"),
    ("t range", {"t": torch.tensor([0, 1, 50, 2])}, ValueError, r"t holds timestep 50, outside .*first at index 2"),
    (
        "importance shape",
        {"importance_weights": torch.ones(4, 1)},
        ValueError,
        r"importance_weights must hold one weight per sample, shape \(4,\), got shape \(4, 1\)",
    ),
    ("importance type", {"importance_weights": [1.0] * 4}, TypeError, r"importance_weights must be a torch.Tensor"),
]


@pytest.mark.parametrize(("case", "override", "error", "match"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_loss_refuses_bad_arguments(case: str, override: dict[str, Any], error: type[Exception], match: str) -> None:
    schedule = NoiseSchedule(timesteps=T)
    x0, noise, t = data()
    model = Recorder(torch.zeros_like(x0))
    kwargs: dict[str, Any] = {"x_start": x0, "t": t, "noise": noise, **override}
    with pytest.raises(error, match=match):
        diffusion_loss(model, schedule, **kwargs)
    assert model.calls == []  # refused before the forward


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (torch.zeros(4, 6), r"the model output has shape \(4, 6\), the 'v' target \(4, 2, 3\)"),
        ((torch.zeros(4, 2, 3),), r"the model output has shape tuple, the 'v' target \(4, 2, 3\)"),
    ],
)
def test_a_model_output_of_the_wrong_shape_is_refused(output: Any, match: str) -> None:
    schedule = NoiseSchedule(timesteps=T, parameterization="v")
    x0, noise, t = data()
    with pytest.raises(ValueError, match=match):
        diffusion_loss(lambda x, t: output, schedule, x0, t, noise)
