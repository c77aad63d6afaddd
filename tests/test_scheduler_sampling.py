"""``scheduler_sample`` with hand-written duck-typed schedulers (no diffusers): the loop, the optional hooks, errors."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_ldm._checks import check_scheduler
from lightning_ldm.callbacks.sample_logger import SampleLogger
from lightning_ldm.scheduler_sampling import scheduler_sample
from tests.test_latent import LDM, Z


class Linear:
    """``prev = x − 0.25·out`` over the steps ``n, n−1, …, 1`` (integer timesteps), recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.timesteps: Tensor = torch.zeros(0)

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        self.calls.append(("set_timesteps", (num_inference_steps, device)))
        self.timesteps = torch.arange(num_inference_steps, 0, -1)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor) -> SimpleNamespace:
        self.calls.append(("step", int(timestep)))
        return SimpleNamespace(prev_sample=sample - 0.25 * model_output)


class Scaled(Linear):
    """With ``init_noise_sigma``, ``scale_model_input`` and a ``step`` taking ``generator``/``eta`` by keyword."""

    init_noise_sigma = 2.0

    def scale_model_input(self, sample: Tensor, timestep: Any) -> Tensor:
        return sample / (1.0 + float(timestep))

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, **kwargs: Any) -> SimpleNamespace:  # type: ignore[override]
        self.calls.append(("kwargs", sorted(kwargs)))
        return super().step(model_output, timestep, sample)


def model_fn(x: Tensor, t: Tensor) -> Tensor:
    return x * 0.5 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def test_the_loop_by_hand() -> None:
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    seen: list[Tensor] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t)
        return model_fn(x, t)

    sched = Linear()
    out = scheduler_sample(recording, x_T, sched, num_steps=3, generator=torch.Generator(), eta=0.5)
    expected = x_T.clone()
    for t in (3, 2, 1):
        expected = expected - 0.25 * (expected * 0.5 + t)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert [tuple(t.tolist()) for t in seen] == [(3,) * 3, (2,) * 3, (1,) * 3]  # one timestep per sample
    assert sched.calls == [("set_timesteps", (3, x_T.device)), ("step", 3), ("step", 2), ("step", 1)]


def test_init_noise_sigma_scale_model_input_and_keywords() -> None:
    x_T = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    sched = Scaled()
    out = scheduler_sample(model_fn, x_T, sched, num_steps=2, generator=torch.Generator(), eta=0.3)
    x = 2.0 * x_T
    for t in (2, 1):
        x = x - 0.25 * model_fn(x / (1.0 + t), torch.full((2,), t))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert [c for c in sched.calls if c[0] == "kwargs"] == [("kwargs", ["eta", "generator"])] * 2
    sched = Scaled()
    scheduler_sample(model_fn, x_T, sched, num_steps=1)  # no generator, eta 0: nothing extra passed
    assert [c for c in sched.calls if c[0] == "kwargs"] == [("kwargs", [])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_model_sees_the_input_dtype_and_the_loop_runs_in_at_least_float32(dtype: torch.dtype) -> None:
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    dtypes: list[torch.dtype] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        dtypes.append(x.dtype)
        return x * (1.0 + 1e-9)

    out = scheduler_sample(recording, x_T, Linear(), num_steps=2)
    assert out.dtype == dtype and dtypes == [dtype] * 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    expected = x_T.to(work)
    for _ in range(2):  # the bfloat16 model output is rounded, the update is not
        expected = expected - 0.25 * (expected.to(dtype) * (1.0 + 1e-9)).to(work)
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
    if dtype == torch.float64:
        exact = x_T * (1.0 - 0.25 * (1.0 + 1e-9)) ** 2  # float64 all the way: the 1e-9 factor is kept
        assert float((out - exact).abs().max()) < 1e-15


class NoStep:
    def set_timesteps(self, n: int) -> None:
        pass


@pytest.mark.parametrize(
    ("scheduler", "match"),
    [
        (
            object(),
            r"diffusers-style scheduler with set_timesteps\(\) and step\(\), but object has no set_timesteps or step",
        ),
        (NoStep(), r"but NoStep has no step$"),
        (SimpleNamespace(set_timesteps=1, step=lambda: 0), r"but SimpleNamespace has no set_timesteps$"),
    ],
)
def test_an_object_without_the_protocol_is_refused(scheduler: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        check_scheduler(scheduler)
    with pytest.raises(TypeError, match=match):
        scheduler_sample(model_fn, torch.zeros(1, 2), scheduler)
    with pytest.raises(TypeError, match=match):
        LDM().sample((1, Z, 4, 4), sampler=scheduler)
    with pytest.raises(TypeError, match=match):
        SampleLogger((1, Z, 4, 4), sample_kwargs={"sampler": scheduler})


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"num_steps=0 is out of range; expected an integer >= 1"):
        scheduler_sample(model_fn, torch.zeros(1, 2), Linear(), num_steps=0)
    with pytest.raises(TypeError, match=r"x_T must be a floating"):
        scheduler_sample(model_fn, torch.zeros(1, 2, dtype=torch.long), Linear())


def test_sample_runs_the_scheduler_through_apply_model() -> None:
    model = LDM("crossattn")
    model.eval()
    x_T = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(4))
    out = model.sample(x_T.shape, cond=context, x_T=x_T, sampler=Linear(), num_steps=3, decode=False)
    expected = x_T.clone()
    with torch.no_grad():
        for t in (3, 2, 1):
            expected = expected - 0.25 * model.apply_model(expected, torch.full((2,), t), context)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
