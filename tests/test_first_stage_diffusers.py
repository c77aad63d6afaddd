"""FirstStage around a tiny diffusers AutoencoderKL: numbers against calling the autoencoder by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL  # a test dependency: a missing install fails here, never skips

from lightning_ldm.first_stage import FirstStage


def tiny_vae(**config: float) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
        **config,
    )
    return vae.eval()


def images(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_factors_come_from_the_config() -> None:
    assert FirstStage(tiny_vae()).scale == 0.18215 and FirstStage(tiny_vae()).shift == 0.0
    fs = FirstStage(tiny_vae(scaling_factor=0.3611, shift_factor=0.1159))
    assert (fs.scale, fs.shift) == (0.3611, 0.1159)
    assert FirstStage(tiny_vae(scaling_factor=0.3611), scale_factor=0.5, shift_factor=0.0).scale == 0.5


@pytest.mark.parametrize("config", [{}, {"scaling_factor": 0.3611, "shift_factor": 0.1159}])
def test_encode_decode_match_the_diffusers_recipe(config: dict[str, float]) -> None:
    vae = tiny_vae(**config)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    fs = FirstStage(vae)
    x = images()
    z = fs.encode(x, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():  # what a diffusers training script does
        latent = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
        expected = (latent - shift) * scale
        torch.testing.assert_close(z, expected, rtol=0, atol=0)
        mode = fs.encode(x, sample_posterior=False)
        torch.testing.assert_close(mode, (vae.encode(x).latent_dist.mode() - shift) * scale, rtol=0, atol=0)
        decoded = fs.decode(z)
        torch.testing.assert_close(decoded, vae.decode(z / scale + shift).sample, rtol=0, atol=0)
    assert z.shape == (5, 4, 8, 8) and decoded.shape == (5, 3, 8, 8)


def test_micro_batching_matches_the_full_batch() -> None:
    vae = tiny_vae()
    x = images(5)
    full = FirstStage(vae).encode(x, generator=torch.Generator().manual_seed(3))
    split = FirstStage(vae, micro_batch_size=2).encode(x, generator=torch.Generator().manual_seed(3))
    # the noise is one draw for the batch; the encoder's convolutions differ by batch size on CPU (within 1e-6)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
    dec_full, dec_split = FirstStage(vae).decode(full), FirstStage(vae, micro_batch_size=2).decode(full)
    torch.testing.assert_close(dec_split, dec_full, rtol=0, atol=1e-6)


def test_frozen_and_weights_optional_in_checkpoint() -> None:
    fs = FirstStage(tiny_vae(), keep_weights_in_checkpoint=False)
    fs.train()
    assert fs.training and not fs.autoencoder.training
    assert not any(p.requires_grad for p in fs.parameters())
    assert sorted(fs.state_dict()) == ["scale_factor", "scale_fitted"]
    fresh = FirstStage(tiny_vae(), keep_weights_in_checkpoint=False)
    assert fresh.load_state_dict(fs.state_dict(), strict=True).missing_keys == []
    kept = FirstStage(tiny_vae()).state_dict()
    assert len(kept) == 2 + len(tiny_vae().state_dict())


def test_fit_scale_on_diffusers_latents() -> None:
    vae = tiny_vae(scaling_factor=1.0, shift_factor=0.5)
    fs = FirstStage(vae, scale_by_std=True)
    raw = fs.encode(images(), generator=torch.Generator().manual_seed(0), scaled=False)
    value = fs.fit_scale(raw)
    assert value == pytest.approx(1.0 / float((raw.double() - 0.5).std()), rel=2**-24)  # float32-rounded
    z = fs.encode(images(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (raw - 0.5) * value, rtol=0, atol=0)
