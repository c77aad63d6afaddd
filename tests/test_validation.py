from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.validation import (
    fixed_noise,
    fixed_noise_seed,
    fixed_timestep_losses,
    log_timestep_losses,
)
from tests.lightning_helpers import TinyDenoiser, make_trainer

GRID = (0, 7, 19)


def _documented_seed(seed: int, dataloader_index: int, batch_index: int, t: int) -> int:
    """The module docstring's derivation, written out with numpy: SeedSequence([seed, 2, d, b, t]) -> 63 bits."""
    state = np.random.SeedSequence([seed, 2, dataloader_index, batch_index, t]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def test_noise_follows_the_documented_derivation() -> None:
    like = torch.empty(3, 8)
    for seed, d, b, t in [(0, 0, 0, 0), (5, 1, 3, 999), (2**40, 2, 17, 5)]:
        expected_seed = _documented_seed(seed, d, b, t)
        assert fixed_noise_seed(seed, t, batch_index=b, dataloader_index=d) == expected_seed
        expected = torch.randn(3, 8, generator=torch.Generator().manual_seed(expected_seed))
        assert torch.equal(fixed_noise(like, t, seed=seed, batch_index=b, dataloader_index=d), expected)


def test_noise_differs_between_keys_and_is_float32() -> None:
    like = torch.empty(4, 8, dtype=torch.float64)
    base = fixed_noise(like, 3, seed=0, batch_index=0)
    assert base.dtype == torch.float32 and base.shape == like.shape
    for kwargs in ({"seed": 1, "batch_index": 0}, {"seed": 0, "batch_index": 1}):
        assert not torch.allclose(base, fixed_noise(like, 3, **kwargs))
    assert not torch.allclose(base, fixed_noise(like, 4, seed=0, batch_index=0))
    assert not torch.allclose(base, fixed_noise(like, 3, seed=0, batch_index=0, dataloader_index=1))


def _by_hand_loss(model: TinyDenoiser, x: Tensor, t: int, noise: Tensor) -> Tensor:
    """eps-parameterization L2 loss from the tables, without diffusion_loss: mean((net(x_t, t) − ε)²)."""
    abar = model.noise_schedule.table("alphas_cumprod")[t].double()
    x_t = (abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()).float()
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    return (model.net(x_t, tt).double() - noise.double()).square().mean()


def test_losses_equal_a_by_hand_loss_and_repeat_exactly() -> None:
    model = TinyDenoiser(timesteps=20)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))

    def loss_fn(x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return model.diffusion_loss(x_start, t=t, noise=noise)

    with torch.no_grad():
        first = fixed_timestep_losses(loss_fn, x, GRID, seed=11, batch_index=2, dataloader_index=1)
        second = fixed_timestep_losses(loss_fn, x, list(GRID), seed=11, batch_index=2, dataloader_index=1)
        assert list(first) == list(GRID)
        for t in GRID:
            assert torch.equal(first[t], second[t])
            noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(_documented_seed(11, 1, 2, t)))
            assert first[t].item() == pytest.approx(_by_hand_loss(model, x, t, noise).item(), rel=1e-5)
        other = fixed_timestep_losses(loss_fn, x, GRID, seed=11, batch_index=3, dataloader_index=1)
        assert all(first[t] != other[t] for t in GRID)


def test_global_rng_is_not_used() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    losses = fixed_timestep_losses(
        lambda x, t, n: (x + n).square().mean(), torch.zeros(2, 3), (1, 2), seed=0, batch_index=0
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert set(losses) == {1, 2}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timesteps": ()}, ValueError, "timesteps must hold at least one timestep"),
        ({"timesteps": (3, 5, 3)}, ValueError, r"timesteps must be distinct, got \[3\] more than once"),
        ({"timesteps": (3, 20), "num_timesteps": 20}, ValueError, r"timesteps\[1\]=20 is out of range.*\[0, 19\]"),
        ({"timesteps": (-1,)}, ValueError, r"timesteps\[0\]=-1 is out of range"),
        ({"timesteps": (1.5,)}, TypeError, r"timesteps\[0\] must be an integer, got 1.5"),
        ({"timesteps": torch.tensor([1])}, TypeError, "timesteps must be a sequence of integers, got Tensor"),
        ({"seed": -1}, ValueError, "seed=-1 is out of range"),
        ({"batch_index": "0"}, TypeError, "batch_index must be an integer"),
        ({"x_start": torch.zeros(())}, ValueError, r"x_start must have a non-empty batch dimension, got shape \(\)"),
        ({"x_start": [1.0]}, TypeError, "x_start must be a torch.Tensor, got list"),
        (
            {"loss_fn": lambda x, t, n: (x - n).square()},
            ValueError,
            r"scalar \(one number\), got shape \(2, 3\) at t=1",
        ),
        ({"loss_fn": lambda x, t, n: 0.5}, TypeError, "loss_fn must return a scalar tensor, got float at t=1"),
    ],
)
def test_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    call: dict[str, Any] = {
        "loss_fn": lambda x, t, n: (x - n).square().mean(),
        "x_start": torch.zeros(2, 3),
        "timesteps": (1, 2),
        "seed": 0,
        "batch_index": 0,
    }
    call.update(kwargs)
    with pytest.raises(error, match=match):
        fixed_timestep_losses(call.pop("loss_fn"), call.pop("x_start"), call.pop("timesteps"), **call)


def test_log_rejects_empty_losses() -> None:
    with pytest.raises(ValueError, match="losses must hold at least one timestep's loss"):
        log_timestep_losses(object(), {})


class FixedGridDenoiser(TinyDenoiser):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0]
        losses = fixed_timestep_losses(
            lambda x0, t, n: self.diffusion_loss(x0, t=t, noise=n),
            x,
            GRID,
            seed=4,
            batch_index=batch_idx,
            dataloader_index=dataloader_idx,
            num_timesteps=self.noise_schedule.num_timesteps,
        )
        return log_timestep_losses(self, losses, prefix="val/fixed", batch_size=x.shape[0])


def test_logged_epoch_values_match_by_hand_and_repeat() -> None:
    data = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(data), batch_size=8)  # batches of 8, 8, 4
    model = FixedGridDenoiser(timesteps=20)
    runs = []
    for _ in range(2):
        (metrics,) = make_trainer().validate(model, loader, verbose=False)
        runs.append(metrics)
    assert runs[0] == runs[1]
    metrics = runs[0]
    assert set(metrics) == {*(f"val/fixed/t={t}" for t in GRID), "val/fixed/mean"}
    with torch.no_grad():
        for t in GRID:
            per_batch, sizes = [], []
            for b, start in enumerate(range(0, 20, 8)):
                x = data[start : start + 8]
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(_documented_seed(4, 0, b, t)))
                per_batch.append(_by_hand_loss(model, x, t, noise).item())
                sizes.append(x.shape[0])
            expected = float(np.average(per_batch, weights=sizes))  # Lightning's batch-size-weighted epoch mean
            assert metrics[f"val/fixed/t={t}"] == pytest.approx(expected, rel=1e-5)
    mean_of_t = float(np.mean([metrics[f"val/fixed/t={t}"] for t in GRID]))
    assert metrics["val/fixed/mean"] == pytest.approx(mean_of_t, rel=1e-6)


def test_logging_goes_through_log_dict_with_sync_dist() -> None:
    calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    class Recorder:
        def log_dict(self, values: dict[str, Any], **kwargs: Any) -> None:
            calls.append(("log_dict", values, kwargs))

        def log(self, name: str, value: Any, **kwargs: Any) -> None:
            calls.append(("log", {name: value}, kwargs))

    mean = log_timestep_losses(Recorder(), {5: torch.tensor(1.0), 9: torch.tensor(4.0)}, prefix="v", batch_size=3)
    assert mean.item() == 2.5
    assert calls[0][1] == {"v/t=5": torch.tensor(1.0), "v/t=9": torch.tensor(4.0)}
    assert calls[1][1] == {"v/mean": torch.tensor(2.5)}
    for _, _, kwargs in calls:
        assert kwargs["sync_dist"] is True and kwargs["on_epoch"] is True and kwargs["on_step"] is False
        assert kwargs["batch_size"] == 3
