"""FirstStage with a tiny CompVis-style autoencoder: numbers, freezing, scale_by_std (2 gloo ranks too), state dicts."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_ldm.first_stage import FirstStage
from tests import compvis_reference as ref


class DiagonalGaussianDistribution:
    """CompVis' ldm.modules.distributions.distributions.DiagonalGaussianDistribution, transcribed."""

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self) -> Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)

    def mode(self) -> Tensor:
        return self.mean


class TinyCompVisAE(nn.Module):
    """The shape of CompVis' AutoencoderKL: encoder → quant_conv → posterior; post_quant_conv → decoder."""

    def __init__(self, z_channels: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Dropout(0.5), nn.SiLU())
        self.quant_conv = nn.Conv2d(8, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, 8, 1)
        self.decoder = nn.Sequential(nn.Dropout(0.5), nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1))

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


class SampleOnly:
    """A posterior with only sample()/mode() (no mean/std attributes)."""

    def __init__(self, h: Tensor) -> None:
        self.h = h

    def sample(self) -> Tensor:
        return self.h + torch.randn(self.h.shape)

    def mode(self) -> Tensor:
        return self.h


class TupleAE(nn.Module):
    """CompVis VQ-style: encode returns (quant, emb_loss, info)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        return self.conv(x), torch.zeros(()), None

    def decode(self, z: Tensor) -> Tensor:
        return z.repeat(1, 2, 1, 1)[:, :3]


class SampleOnlyAE(TupleAE):
    def encode(self, x: Tensor) -> SampleOnly:  # type: ignore[override]
        return SampleOnly(self.conv(x))


def make_ae(seed: int = 0) -> TinyCompVisAE:
    torch.manual_seed(seed)
    return TinyCompVisAE()


def images(batch: int = 5, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- numbers
def test_encode_draws_mean_plus_std_noise_then_shifts_and_scales() -> None:
    ae = make_ae()
    fs = FirstStage(ae, scale_factor=0.5, shift_factor=0.25)
    x = images()
    z = fs.encode(x, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        post = ae.encode(x)
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
        expected = (post.mean + post.std * noise - 0.25) * 0.5
    assert z.shape == (5, 2, 4, 4) and z.dtype == torch.float32 and not z.requires_grad
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_encode_mode_and_decode_by_hand() -> None:
    ae = make_ae()
    fs = FirstStage(ae, scale_factor=0.18215)
    x = images()
    z = fs.encode(x, sample_posterior=False)
    with torch.no_grad():
        mean = ae.encode(x).mean
        torch.testing.assert_close(z, mean * 0.18215, rtol=0, atol=0)
        torch.testing.assert_close(fs.decode(z), ae.decode(z / 0.18215), rtol=0, atol=0)
        torch.testing.assert_close(fs.decode(mean, scaled=False), ae.decode(mean), rtol=0, atol=0)
        torch.testing.assert_close(fs.encode(x, scaled=False, sample_posterior=False), mean, rtol=0, atol=0)


def test_scale_and_unscale_are_inverse() -> None:
    fs = FirstStage(make_ae(), scale_factor=0.5, shift_factor=-1.5)
    z = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(fs.scale_latents(z), (z + 1.5) * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(fs.unscale_latents(fs.scale_latents(z)), z, rtol=0, atol=1e-6)


def test_tuple_output_and_sample_only_distribution() -> None:
    torch.manual_seed(0)
    tup = TupleAE()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(FirstStage(tup, scale_factor=2.0).encode(x), tup.conv(x) * 2.0, rtol=0, atol=0)
    torch.manual_seed(0)
    only = SampleOnlyAE()
    fs = FirstStage(only)
    torch.manual_seed(123)
    z = fs.encode(x)
    with torch.no_grad():
        h = only.conv(x)
    torch.manual_seed(123)
    torch.testing.assert_close(z, h + torch.randn(h.shape), rtol=0, atol=0)
    torch.testing.assert_close(fs.encode(x, sample_posterior=False), h, rtol=0, atol=0)


class TorchDistributionAE(TinyCompVisAE):
    """``encode`` returns a ``torch.distributions`` object: Normal, Independent(Normal) or Laplace (mean/scale)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def encode(self, x: Tensor) -> Any:  # type: ignore[override]
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        scale = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if self.kind == "laplace":
            return torch.distributions.Laplace(mean, scale)
        normal = torch.distributions.Normal(mean, scale)
        return torch.distributions.Independent(normal, 3) if self.kind == "independent" else normal


@pytest.mark.parametrize("micro", [None, 2])
@pytest.mark.parametrize("kind", ["normal", "independent"])
def test_torch_normal_posterior_is_drawn_from_the_generator(kind: str, micro: int | None) -> None:
    """Issue 13.4: a torch Normal (``stddev``, no ``std``) is drawn as mean + stddev·ε from the generator, not by
    ``.sample()`` from the global RNG."""
    torch.manual_seed(0)
    ae = TorchDistributionAE(kind)
    fs = FirstStage(ae, scale_factor=0.5, micro_batch_size=micro)
    x = images()
    torch.manual_seed(99)
    global_state = torch.get_rng_state()
    z = fs.encode(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not consumed
    with torch.no_grad():
        posts = [ae.encode(c) for c in (x.split(micro) if micro else (x,))]
        mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.stddev for p in posts])
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (mean + std * noise) * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(fs.encode(x, sample_posterior=False), mean * 0.5, rtol=0, atol=0)


def test_other_torch_distributions_are_refused_with_a_generator() -> None:
    """Issue 13.4: mean + stddev·ε is no draw from a Laplace; with a generator it is refused, without one the
    distribution's own ``.sample()`` draws from the global RNG (as documented for ``generator=None``)."""
    torch.manual_seed(0)
    ae = TorchDistributionAE("laplace")
    fs = FirstStage(ae)
    x = images()
    with pytest.raises(TypeError, match=r"encode returned a torch\.distributions\.Laplace, which cannot draw from"):
        fs.encode(x, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    z = fs.encode(x)
    with torch.no_grad():
        post = ae.encode(x)
    torch.manual_seed(5)
    torch.testing.assert_close(z, post.sample(), rtol=0, atol=0)
    torch.testing.assert_close(fs.encode(x, sample_posterior=False, generator=torch.Generator()), post.mean)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batching(micro: int) -> None:
    ae = make_ae()
    full, split = FirstStage(ae, scale_factor=0.3), FirstStage(ae, scale_factor=0.3, micro_batch_size=micro)
    x = images(5)
    z_full = full.encode(x, generator=torch.Generator().manual_seed(3))
    z_split = split.encode(x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the split run is exactly the autoencoder called per chunk, with one noise draw
        post = [ae.encode(c) for c in x.split(micro)]
        mean, std = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z_split, (mean + std * noise) * 0.3, rtol=0, atol=0)
    # CPU convolutions are not batch-invariant (oneDNN picks kernels by batch size): within 1e-6, not bitwise.
    torch.testing.assert_close(z_split, z_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.decode(z_full), full.decode(z_full), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- frozen
def test_compvis_frozen_autoencoder_with_disabled_train_is_wrapped() -> None:
    """Issue 13.9: CompVis' frozen stage (``train = disabled_train``) returns False from ``.eval()``."""
    ae = ref.freeze_stage(make_ae())
    assert ae.eval() is False  # what the wrapper must not chain on
    fs = FirstStage(ae, scale_factor=0.5)
    assert fs.autoencoder is ae and not ae.training and not any(m.training for m in ae.modules())
    nn.Sequential(fs).train()
    assert fs.training and not any(m.training for m in ae.modules())
    x = images()
    with torch.no_grad():
        mean = ae.encode(x).mean
    torch.testing.assert_close(fs.encode(x, sample_posterior=False), mean * 0.5, rtol=0, atol=0)


def test_frozen_through_train_and_no_grads() -> None:
    ae = make_ae()
    fs = FirstStage(ae)
    parent = nn.Sequential(fs, nn.Linear(2, 2))
    parent.train()
    assert fs.training and not ae.training and not any(m.training for m in ae.modules())
    assert all(not p.requires_grad for p in ae.parameters())
    x = images().requires_grad_(True)
    z1, z2 = fs.encode(x, sample_posterior=False), fs.encode(x, sample_posterior=False)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)  # dropout stays off
    assert not z1.requires_grad and not fs.decode(z1).requires_grad
    parent.eval()
    assert not fs.training and not ae.training
    assert [n for n, p in parent.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]


def test_autocast_follows_or_is_switched_off() -> None:
    ae = make_ae()
    seen: list[torch.dtype] = []
    ae.quant_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_on = FirstStage(ae).encode(x, sample_posterior=False)
        z_off = FirstStage(ae, autocast=False).encode(x.bfloat16(), sample_posterior=False)
    assert seen == [torch.bfloat16, torch.float32]
    assert z_on.dtype == torch.float32 and z_off.dtype == torch.bfloat16  # latents come back in x's dtype
    with torch.no_grad():
        expected = ae.encode(x.bfloat16().float()).mean
    torch.testing.assert_close(z_off, expected.bfloat16(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- scale_by_std
def test_fit_scale_is_one_over_std() -> None:
    fs = FirstStage(make_ae(), scale_by_std=True, shift_factor=0.7)
    assert fs.needs_scale_fit and fs.scale == 1.0
    z = fs.encode(images(), generator=torch.Generator().manual_seed(0), scaled=False)
    value = fs.fit_scale(z)
    assert value == fs.scale and fs.is_scale_fitted and not fs.needs_scale_fit
    assert value == pytest.approx(1.0 / float((z.double() - 0.7).flatten().std()), rel=2**-24)  # float32-rounded
    assert value == pytest.approx(float(1.0 / z.flatten().std()), rel=1e-6)  # CompVis, in float32
    assert float(fs.scale_factor) == pytest.approx(value, rel=1e-7) and bool(fs.scale_fitted)
    x = images(seed=9)
    torch.testing.assert_close(
        fs.encode(x, sample_posterior=False), (fs.encode(x, sample_posterior=False, scaled=False) - 0.7) * value
    )


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fs = FirstStage(make_ae(), scale_by_std=True)
        latents = torch.randn(3 + rank, 2, 4, 4, generator=torch.Generator().manual_seed(100 + rank)) * (1 + rank)
        value = fs.fit_scale(latents)
        bad = latents.clone()
        if rank == 1:
            bad[0, 0, 0, 0] = float("nan")
        try:
            fs.fit_scale(bad)
            message = "no error"
        except ValueError as err:
            message = str(err)
        torch.save({"value": value, "latents": latents, "message": message}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fit_scale_pools_the_std_over_two_gloo_ranks(tmp_path: Path) -> None:
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    pooled = torch.cat([r["latents"].flatten() for r in results]).double()
    expected = 1.0 / float(pooled.std())
    assert results[0]["value"] == results[1]["value"]
    assert results[0]["value"] == pytest.approx(expected, rel=2**-24)  # float32-rounded
    local = 1.0 / float(results[0]["latents"].double().std())
    assert abs(local - expected) / expected > 0.05  # the rank-local statistic would differ
    for r in results:  # a NaN on rank 1 is refused on both ranks (no rank is left waiting in a collective)
        assert "1 non-finite values (over all ranks)" in r["message"]


# ---------------------------------------------------------------------------------------------- state dicts
def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_restores_the_fitted_factor() -> None:
    fs = FirstStage(make_ae(), scale_by_std=True)
    value = fs.fit_scale(torch.randn(4, 2, 4, 4) * 3)
    parent = nn.ModuleDict({"first_stage": fs})
    state = roundtrip(parent.state_dict())
    assert state["first_stage.scale_factor"].dtype == torch.float32
    assert state["first_stage.scale_factor"].item() == pytest.approx(value, rel=1e-7)
    assert state["first_stage.scale_fitted"].item() is True
    fresh = FirstStage(make_ae(seed=5), scale_by_std=True)
    nn.ModuleDict({"first_stage": fresh}).load_state_dict(state)
    assert fresh.is_scale_fitted and not fresh.needs_scale_fit
    assert fresh.scale == float(torch.tensor(value, dtype=torch.float32))
    torch.testing.assert_close(fresh.autoencoder.quant_conv.weight, fs.autoencoder.quant_conv.weight, rtol=0, atol=0)


def test_unfitted_state_is_restored_unfitted() -> None:
    state = FirstStage(make_ae(), scale_by_std=True).state_dict()
    fresh = FirstStage(make_ae(), scale_by_std=True)
    fresh.load_state_dict(state)
    assert fresh.needs_scale_fit and fresh.scale == 1.0


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize(
    ("stored", "match"),
    [
        (
            float("nan"),
            r"the checkpoint's first_stage\.scale_factor=nan must be finite; expected a number in \(0, inf\]",
        ),
        (
            float("inf"),
            r"the checkpoint's first_stage\.scale_factor=inf must be finite; expected a number in \(0, inf\]",
        ),
        (0.0, r"the checkpoint's first_stage\.scale_factor=0 is out of range; expected a number in \(0, inf\]"),
        (-0.5, r"the checkpoint's first_stage\.scale_factor=-0\.5 is out of range; expected a number in \(0, inf\]"),
    ],
)
def test_corrupt_stored_scale_factor_is_refused_at_load(stored: float, match: str, scale_by_std: bool) -> None:
    """Issue 13.2: a NaN, infinite, zero or negative stored factor is refused with the constructor's message."""
    options: dict[str, Any] = {"scale_by_std": True} if scale_by_std else {"scale_factor": 0.5}
    state = roundtrip(nn.ModuleDict({"first_stage": FirstStage(make_ae(), **options)}).state_dict())
    state["first_stage.scale_factor"] = torch.tensor(stored)
    fresh = FirstStage(make_ae(), **options)
    with pytest.raises(ValueError, match=match):
        nn.ModuleDict({"first_stage": fresh}).load_state_dict(state)
    with pytest.raises(ValueError, match=match.replace(r"the checkpoint's first_stage\.", "")):
        FirstStage(make_ae(), scale_factor=stored)  # the constructor's message, without the key
    assert fresh.scale == (1.0 if scale_by_std else 0.5) and not fresh.is_scale_fitted  # nothing was restored


def test_stored_scale_factor_with_several_values_is_refused() -> None:
    state = FirstStage(make_ae(), scale_by_std=True).state_dict()
    state["scale_factor"] = torch.tensor([0.5, 0.25])
    with pytest.raises(
        ValueError, match=r"the checkpoint's scale_factor must hold one number, got a tensor of shape \(2,\)"
    ):
        FirstStage(make_ae(), scale_by_std=True).load_state_dict(state)


def test_store_scale_writes_the_live_factor_over_a_stale_copy() -> None:
    """Issue 13.1: a copy taken before the fit (an EMA average) holds the unfitted factor; the live one writes over."""
    live = FirstStage(make_ae(), scale_by_std=True)
    averaged = copy.deepcopy(live)  # what AveragedModel does at fit start
    value = live.fit_scale(torch.randn(4, 2, 4, 4) * 3)
    state = nn.ModuleDict({"first_stage": averaged}).state_dict()
    assert float(state["first_stage.scale_factor"]) == 1.0 and not bool(state["first_stage.scale_fitted"])
    live.store_scale(state, "first_stage.")
    assert state["first_stage.scale_factor"].dtype == torch.float32
    assert float(state["first_stage.scale_factor"]) == value and bool(state["first_stage.scale_fitted"])
    fresh = FirstStage(make_ae(), scale_by_std=True)
    nn.ModuleDict({"first_stage": fresh}).load_state_dict(state)
    assert fresh.scale == value and fresh.is_scale_fitted


def test_the_factor_in_use_survives_casts_and_buffer_overwrites() -> None:
    fs = FirstStage(make_ae(), scale_factor=0.18215)
    fs.to(torch.bfloat16)
    with torch.no_grad():
        fs.scale_factor.fill_(0.3)  # e.g. a weight-averaging callback copying averaged buffers
    assert fs.scale == 0.18215
    assert fs.state_dict()["scale_factor"].dtype == torch.float32
    assert fs.state_dict()["scale_factor"].item() == float(torch.tensor(0.18215, dtype=torch.float32))


def test_fixed_factor_mismatch_is_refused() -> None:
    state = FirstStage(make_ae(), scale_factor=0.5).state_dict()
    FirstStage(make_ae(), scale_factor=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"scale_factor=0.5 differs from the fixed scale_factor=0.18215"):
        FirstStage(make_ae(), scale_factor=0.18215).load_state_dict(state)
    restored = FirstStage(make_ae(), scale_factor=0.18215, scale_by_std=True)
    restored.load_state_dict(state)
    assert restored.scale == 0.5


def test_weights_can_be_left_out_of_the_checkpoint() -> None:
    fs = FirstStage(make_ae(), keep_weights_in_checkpoint=False, scale_by_std=True)
    fs.fit_scale(torch.randn(2, 2, 4, 4) * 2)
    parent = nn.ModuleDict({"first_stage": fs, "net": nn.Linear(2, 2)})
    state = parent.state_dict()
    assert sorted(state) == ["first_stage.scale_factor", "first_stage.scale_fitted", "net.bias", "net.weight"]
    fresh_ae = make_ae(seed=3)
    before = {k: v.clone() for k, v in fresh_ae.state_dict().items()}
    fresh = nn.ModuleDict(
        {
            "first_stage": FirstStage(fresh_ae, keep_weights_in_checkpoint=False, scale_by_std=True),
            "net": nn.Linear(2, 2),
        }
    )
    result = fresh.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert fresh["first_stage"].scale == pytest.approx(fs.scale, rel=1e-7)
    assert all(torch.equal(before[k], v) for k, v in fresh_ae.state_dict().items())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"first_stage.autoencoder"):
        nn.ModuleDict(
            {"first_stage": FirstStage(make_ae(), scale_by_std=True), "net": nn.Linear(2, 2)}
        ).load_state_dict(state)


def test_a_missing_fitted_flag_counts_as_fitted() -> None:
    fresh = FirstStage(make_ae(), scale_by_std=True)
    state = {k: v for k, v in FirstStage(make_ae()).state_dict().items() if k != "scale_fitted"}
    state["scale_factor"] = torch.tensor(0.25)
    assert fresh.load_state_dict(state).missing_keys == []
    assert fresh.scale == 0.25 and fresh.is_scale_fitted


def test_lightning_fit_keeps_the_autoencoder_in_eval() -> None:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.first_stage = FirstStage(make_ae(), scale_by_std=True)
            self.net = nn.Conv2d(2, 2, 1)
            self.modes: list[bool] = []

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if self.first_stage.needs_scale_fit:
                self.first_stage.fit_scale(self.first_stage.encode(batch[0], scaled=False))
            self.modes.append(self.first_stage.autoencoder.training)
            z = self.first_stage.encode(batch[0])
            return (self.net(z) - z).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images(8)), batch_size=4)
    model = Module()
    ae_before = {k: v.clone() for k, v in model.first_stage.autoencoder.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, data)
    assert model.modes == [False, False] and model.first_stage.is_scale_fitted
    assert all(torch.equal(ae_before[k], v) for k, v in model.first_stage.autoencoder.state_dict().items())


# ---------------------------------------------------------------------------------------------- errors
class NoDecode(nn.Module):
    def encode(self, x: Tensor) -> Tensor:
        return x


class WeirdAE(TupleAE):
    def encode(self, x: Tensor) -> Any:  # type: ignore[override]
        return {"latents": x}


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: FirstStage(NoDecode()), TypeError, r"autoencoder NoDecode has no callable `decode`"),
        (lambda: FirstStage(nn.Linear(2, 2)), TypeError, r"autoencoder Linear has no callable `encode`"),
        (
            lambda: FirstStage(object()),
            TypeError,
            r"autoencoder must be an nn.Module with encode/decode, got <object object at .*> of type object",
        ),
        (
            lambda: FirstStage(make_ae(), scale_factor=0.0),
            ValueError,
            r"scale_factor=0 is out of range; expected a number in \(0, inf\]",
        ),
        (lambda: FirstStage(make_ae(), scale_factor=float("nan")), ValueError, r"scale_factor=nan must be finite"),
        (lambda: FirstStage(make_ae(), shift_factor="1"), TypeError, r"shift_factor must be a real number"),
        (lambda: FirstStage(make_ae(), micro_batch_size=0), ValueError, r"micro_batch_size=0 is out of range"),
        (lambda: FirstStage(make_ae(), micro_batch_size=2.0), TypeError, r"micro_batch_size must be an integer"),
        (lambda: FirstStage(make_ae(), autocast=1), TypeError, r"autocast must be a bool, got 1"),
    ],
)
def test_construction_errors(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("name", ["scale_by_std", "autocast", "keep_weights_in_checkpoint"])
def test_flags_accept_a_numpy_bool(name: str) -> None:
    stage = FirstStage(make_ae(), **{name: np.True_})
    assert getattr(stage, name) is True


def test_call_errors() -> None:
    fixed, fitting = FirstStage(make_ae(), scale_factor=0.5), FirstStage(make_ae(), scale_by_std=True)
    with pytest.raises(ValueError, match=r"fit_scale needs scale_by_std=True; the scale_factor=0.5 is fixed"):
        fixed.fit_scale(torch.randn(4))
    with pytest.raises(ValueError, match=r"the latents are constant \(std 0\)"):
        fitting.fit_scale(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"needs at least 2 latent values \(over all ranks\) for a std, got 1"):
        fitting.fit_scale(torch.ones(1))
    with pytest.raises(ValueError, match=r"the latents hold 2 non-finite values"):
        fitting.fit_scale(torch.tensor([1.0, float("inf"), float("nan")]))
    with pytest.raises(ValueError, match=r"fit_scale needs floating latents, got a torch.int64 Tensor"):
        fitting.fit_scale(torch.arange(4))
    assert fitting.needs_scale_fit
    with pytest.raises(ValueError, match=r"needs a Tensor with a non-empty batch dimension, got \(0, 3, 8, 8\)"):
        fixed.encode(torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"non-empty batch dimension, got list"):
        fixed.decode([1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"encode returned dict, which is neither a Tensor nor a distribution"):
        FirstStage(WeirdAE()).encode(images())
