"""CompVis LatentDiffusion state dicts in and out (issue 15), and CompVis' txt2img logic run against our module.

The CompVis side is ``tests/compvis_reference.py``'s ``LatentDiffusion``: CompVis' key layout
(``model.diffusion_model``, ``model_ema``, ``first_stage_model``, ``cond_stage_model``, the schedule buffers,
``scale_factor``) and the methods its scripts call. Both directions are checked by loading with ``strict=True`` and
comparing outputs bitwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.compat import CompVisCompat, DiffusionModelHolder
from lightning_ldm.compvis_checkpoint import COMPVIS_TABLES, from_compvis_state_dict, to_compvis_state_dict
from lightning_ldm.latent import LatentDiffusionMixin
from tests import compvis_reference as compvis
from tests.lightning_helpers import make_trainer
from tests.test_latent import CTX, CompVisDDIMSampler, TinyCondUNet, Z

T = 50
SCHEDULE = {"timesteps": T, "linear_start": 0.00085, "linear_end": 0.012}
LENGTH = 5  # tokens per prompt


class CompVisAE(nn.Module):
    """(B, 3, 8, 8) ↔ (B, Z, 4, 4); ``encode`` returns CompVis' ``DiagonalGaussianDistribution``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 2 * Z, 2, stride=2)
        self.decoder = nn.ConvTranspose2d(Z, 3, 2, stride=2)

    def encode(self, x: Tensor) -> compvis.DiagonalGaussianDistribution:
        return compvis.DiagonalGaussianDistribution(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


class TinyTextEncoder(nn.Module):
    """A prompt-like condition encoder: ``encode(list of str)`` → ``(B, LENGTH, CTX)`` (character codes, embedded)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(128, CTX)
        self.proj = nn.Linear(CTX, CTX)

    def encode(self, text: list[str]) -> Tensor:
        tokens = torch.tensor([[ord(ch) % 128 for ch in (s + " " * LENGTH)[:LENGTH]] for s in text])
        return self.proj(self.embedding(tokens))


def parts(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyCondUNet(Z), CompVisAE(), TinyTextEncoder()


def reference(seed: int = 0, **options: Any) -> compvis.LatentDiffusion:
    unet, ae, text = parts(seed)
    return compvis.LatentDiffusion(unet, ae, text, conditioning_key="crossattn", **SCHEDULE, **options)


class LDM(CompVisCompat, LatentDiffusionMixin, L.LightningModule):
    def __init__(self, seed: int = 1, *, hold: bool = False, scale_by_std: bool = True, scale_factor: float = 1.0):
        super().__init__()
        self.register_schedule(**SCHEDULE)  # type: ignore[arg-type]
        unet, ae, text = parts(seed)
        self.register_first_stage(ae, scale_by_std=scale_by_std, scale_factor=scale_factor)
        self.register_conditioning("crossattn")
        self.register_cond_stage(text)
        self.model = DiffusionModelHolder(unet) if hold else unet

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        return self.diffusion_loss(x, self.get_learned_conditioning(["a cat"] * x.shape[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainable_parameters(), lr=0.5)


def inputs(seed: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 8, 8, generator=g)
    x_t = torch.randn(3, Z, 4, 4, generator=g)
    return images, x_t, torch.tensor([0, 17, 49]), torch.randn(3, Z, 4, 4, generator=g)


def outputs(model: Any, cond_list: bool) -> dict[str, Tensor]:
    """What a CompVis script computes with ``model``: conditioning, a prediction, an encoding and a decoding."""
    images, x_t, t, z = inputs()
    c = model.get_learned_conditioning(["a red car", "", "dog"])
    torch.manual_seed(5)  # the posterior sample comes from the global RNG in both
    encoding = model.get_first_stage_encoding(model.encode_first_stage(images))
    with torch.no_grad():
        eps = model.apply_model(x_t, t, [c] if cond_list else c)
    return {"c": c.detach(), "eps": eps, "encoding": encoding, "decoded": model.decode_first_stage(z)}


def assert_same_outputs(ours: LDM, theirs: compvis.LatentDiffusion) -> None:
    mine, reference_out = outputs(ours, cond_list=False), outputs(theirs, cond_list=True)
    for name, value in reference_out.items():
        assert torch.equal(mine[name], value), name


# ------------------------------------------------------------------------------------------------ CompVis → ours
@pytest.mark.parametrize("hold", [False, True])
def test_a_compvis_state_dict_loads_strictly_and_gives_compvis_outputs_bitwise(hold: bool) -> None:
    theirs = reference(scale_by_std=True, scale_factor=0.37)
    ours = LDM(hold=hold)
    assert not torch.equal(outputs(ours, False)["eps"], outputs(theirs, True)["eps"])  # different weights before
    state = theirs.state_dict()
    assert {k for k in state if k in COMPVIS_TABLES} == set(COMPVIS_TABLES) and "model_ema.decay" in state
    result = ours.load_state_dict(from_compvis_state_dict(ours, state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(ours, theirs)
    assert ours.first_stage is not None and ours.first_stage.is_scale_fitted  # restored, not refitted
    assert ours.scale_factor == float(torch.tensor(0.37)) == ours.first_stage.scale
    if hold:
        assert ours.model.diffusion_model is ours.model.diffusion_model  # CompVis' path exists
        assert "model.diffusion_model.conv_in.weight" in ours.state_dict()


def test_use_ema_loads_the_compvis_ema_shadows_as_the_weights() -> None:
    theirs = reference()
    with torch.no_grad():
        for p in theirs.model.parameters():
            p.add_(0.1)
    theirs.model_ema(theirs.model)  # one LitEma update: the shadows now differ from the weights
    ours, ours_ema = LDM(), LDM()
    ours.load_state_dict(from_compvis_state_dict(ours, theirs.state_dict()))
    ours_ema.load_state_dict(from_compvis_state_dict(ours_ema, theirs.state_dict(), use_ema=True))
    assert_same_outputs(ours, theirs)
    with theirs.ema_scope():
        assert_same_outputs(ours_ema, theirs)
    assert not torch.equal(ours.model.conv_in.weight, ours_ema.model.conv_in.weight)


def test_use_ema_without_shadows_and_the_wrong_module_are_refused() -> None:
    state = reference(use_ema=False).state_dict()
    ours = LDM()
    with pytest.raises(ValueError, match=r"use_ema=True but the state dict has no EMA shadow for \d+ denoiser param"):
        from_compvis_state_dict(ours, state, use_ema=True)
    with pytest.raises(TypeError, match=r"use_ema must be a bool"):
        from_compvis_state_dict(ours, state, use_ema=1)  # type: ignore[arg-type]

    class NotCompat(LatentDiffusionMixin, L.LightningModule):
        pass

    with pytest.raises(TypeError, match=r"module must be a CompVisCompat latent diffusion module.*got NotCompat"):
        to_compvis_state_dict(NotCompat())

    class NoFirstStage(CompVisCompat, LatentDiffusionMixin, L.LightningModule):
        pass

    with pytest.raises(ValueError, match=r"NoFirstStage needs a first stage \(register_first_stage\) and a denoiser"):
        from_compvis_state_dict(NoFirstStage(), state)


def test_a_differing_schedule_table_is_refused() -> None:
    state = reference().state_dict()
    state["alphas_cumprod"] = state["alphas_cumprod"] * 1.001
    ours = LDM()
    with pytest.raises(RuntimeError, match=r"the state dict's schedule table 'alphas_cumprod' differs at torch.float"):
        ours.load_state_dict(from_compvis_state_dict(ours, state))


def test_a_fixed_scale_factor_must_match_the_compvis_one() -> None:
    state = reference(scale_by_std=True, scale_factor=0.5).state_dict()
    ours = LDM(scale_by_std=False, scale_factor=0.18215)
    with pytest.raises(ValueError, match=r"scale_factor=0.5 differs from the fixed scale_factor=0.18215"):
        ours.load_state_dict(from_compvis_state_dict(ours, state))
    # CompVis without scale_by_std keeps scale_factor out of its state dict: ours keeps its own
    plain = LDM(scale_by_std=False, scale_factor=0.18215)
    plain.load_state_dict(from_compvis_state_dict(plain, reference(scale_factor=0.18215).state_dict()))
    assert plain.scale_factor == 0.18215


# ------------------------------------------------------------------------------------------------ ours → CompVis
@pytest.mark.parametrize(("use_ema", "scale_by_std", "hold"), [(True, True, False), (False, False, True)])
def test_our_module_writes_a_state_dict_compvis_loads_strictly(use_ema: bool, scale_by_std: bool, hold: bool) -> None:
    ours = LDM(seed=1, hold=hold, scale_by_std=scale_by_std, scale_factor=0.25)
    theirs = reference(use_ema=use_ema, scale_by_std=scale_by_std, scale_factor=1.0 if scale_by_std else 0.25)
    state = to_compvis_state_dict(ours, use_ema=use_ema)
    assert set(state) == set(theirs.state_dict())
    theirs.load_state_dict(state, strict=True)
    assert_same_outputs(ours, theirs)
    for name in COMPVIS_TABLES:
        assert state[name].dtype == torch.float32 and state[name].device.type == "cpu"
        assert torch.equal(state[name], getattr(theirs, name)), name
    if scale_by_std:
        assert float(theirs.scale_factor) == 0.25
    if use_ema:  # no Trainer: the shadows are the current weights
        assert torch.equal(theirs.model_ema.diffusion_modelconv_inweight, ours.model.conv_in.weight)


def test_the_round_trip_through_compvis_keeps_every_tensor() -> None:
    ours, again = LDM(seed=1, hold=True), LDM(seed=2, hold=True)
    again.load_state_dict(from_compvis_state_dict(again, to_compvis_state_dict(ours, use_ema=True)))
    mine, back = ours.state_dict(), again.state_dict()
    assert set(mine) == set(back)
    assert all(torch.equal(mine[k], back[k]) for k in mine if k != "first_stage.scale_fitted")
    # a scale_factor read from a CompVis state dict counts as fitted (CompVis does not refit a restarted model)
    assert not bool(mine["first_stage.scale_fitted"]) and bool(back["first_stage.scale_fitted"])


# ------------------------------------------------------------------------- EMA: Lightning's weights, CompVis' names
def fitted_with_ema() -> tuple[LDM, L.Trainer]:
    model = LDM(seed=1)
    trainer = make_trainer(max_steps=3, callbacks=[EMAWeightAveraging(decay=0.5)])
    data = TensorDataset(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    trainer.fit(model, DataLoader(data, batch_size=4))
    return model, trainer


def test_ema_scope_and_to_compvis_use_the_averaged_weights_of_the_trainer() -> None:
    model, trainer = fitted_with_ema()
    averaged = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))._average_model.module
    with torch.no_grad():  # Lightning copies the average into the module at the end of fit: make them differ again
        for p in model.model.parameters():
            p.add_(0.25)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.clone() for k, v in averaged.model.state_dict().items()}
    assert not torch.equal(average["conv_in.weight"], model.model.conv_in.weight)
    with model.ema_scope("test"):
        assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in average.items())
        inside = outputs(model, cond_list=False)
    after = model.state_dict()
    assert all(torch.equal(training[k], after[k]) for k in training)  # the training weights are back bitwise

    state = to_compvis_state_dict(model, use_ema=True)
    assert torch.equal(state["model_ema.diffusion_modelconv_inweight"], average["conv_in.weight"])
    assert torch.equal(state["model.diffusion_model.conv_in.weight"], model.model.conv_in.weight)
    theirs = reference(use_ema=True, scale_by_std=True)
    theirs.load_state_dict(state, strict=True)
    with theirs.ema_scope():
        reference_inside = outputs(theirs, cond_list=True)
    for name, value in reference_inside.items():
        assert torch.equal(inside[name], value), name


# ------------------------------------------------------------------------- CompVis' txt2img logic, run unchanged
def txt2img(model: Any, prompts: list[str], scale: float, steps: int, x_T: Tensor) -> Tensor:  # noqa: N803
    """CompVis' ``scripts/txt2img.py`` sampling loop: prompts → conditioning, DDIM, decode, to [0, 1]."""
    with torch.no_grad(), model.ema_scope():
        uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
        c = model.get_learned_conditioning(prompts)
        samples_ddim = CompVisDDIMSampler(model).sample(steps, x_T, c, uc, scale)
        x_samples_ddim = model.decode_first_stage(samples_ddim)
        return torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_compvis_txt2img_runs_against_our_module_and_matches_compvis(scale: float) -> None:
    theirs = reference(scale_by_std=True, scale_factor=0.6)
    ours = LDM(seed=1)
    ours.load_state_dict(from_compvis_state_dict(ours, theirs.state_dict()))
    ours.eval()
    x_T = torch.randn(2, Z, 4, 4, generator=torch.Generator().manual_seed(9))
    prompts = ["a photograph of an astronaut", "a painting of a fox"]
    expected = txt2img(theirs, prompts, scale, 10, x_T)
    got = txt2img(ours, prompts, scale, 10, x_T)
    assert expected.shape == (2, 3, 8, 8) and float(expected.std()) > 0.01
    assert torch.equal(got, expected)
    # and our own sampler, from the same conditioning, lands on the same images
    c = ours.get_learned_conditioning(prompts)
    uc = ours.get_learned_conditioning(["", ""])
    ours_sampled = ours.sample(x_T.shape, cond=c, uncond=uc, guidance_scale=scale, num_steps=10, x_T=x_T)
    torch.testing.assert_close(torch.clamp((ours_sampled + 1.0) / 2.0, 0.0, 1.0), expected, rtol=1e-5, atol=1e-5)
