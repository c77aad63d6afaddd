"""diffusers UNets as the denoiser, with no adapter: ``UNet2DModel``/``UNet2DConditionModel`` as ``self.model`` of a
LatentDiffusionMixin (every conditioning key) and as the network of a plain DiffusionMixin.

The reference is the direct diffusers call (``unet(x, t, encoder_hidden_states=c).sample``) and a diffusers-pipeline
style sampling loop written here. Tiny random-init models, nothing downloaded. diffusers is a declared test
dependency: it is imported plainly, so a missing install fails collection loudly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.call_convention import resolve_call_convention
from lightning_ldm.callbacks import DiffusionSeedCallback
from lightning_ldm.conditioning import apply_conditioned
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.mixin import DiffusionMixin
from tests.lightning_helpers import make_trainer

T = 20
Z = 2  # latent channels
CTX = 6  # cross-attention width
Y_DIM = 3  # adm vector width
NUM_CLASSES = 4
B = 4


# ------------------------------------------------------------------------------------------------ tiny models
def _common(in_channels: int, out_channels: int, size: int) -> dict[str, Any]:
    return {
        "sample_size": size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
    }


def unet2d(in_channels: int = Z, *, classes: bool = False, out: int = Z, size: int = 4) -> UNet2DModel:
    """``UNet2DModel(sample, timestep, class_labels=None)``; with ``classes``, ``num_class_embeds=4``."""
    torch.manual_seed(0)
    return UNet2DModel(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES if classes else None,
        **_common(in_channels, out, size),
    )


def cond_unet(in_channels: int = Z, *, out: int = Z, size: int = 4, **config: Any) -> UNet2DConditionModel:
    """``UNet2DConditionModel`` with one cross-attention block each way (``cross_attention_dim=CTX``)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CTX,
        **_common(in_channels, out, size),
        **config,
    )


def vector_unet() -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` without cross-attention, conditioned on a float vector (``class_embed_type``)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=Y_DIM,
        **_common(Z, Z, 4),
    )


def tiny_vae() -> AutoencoderKL:
    """(B, 3, 4, 4) images <-> (B, Z, 4, 4) latents."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=Z,
        norm_num_groups=8,
        sample_size=4,
    )


class LDM(LatentDiffusionMixin, L.LightningModule):
    """A latent diffusion model whose ``self.model`` is the diffusers UNet it is given."""

    def __init__(
        self,
        unet: nn.Module,
        conditioning_key: str | None,
        *,
        vae: nn.Module | None = None,
        call_convention: str = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_schedule(timesteps=T)
        if vae is not None:
            self.register_first_stage(vae, scale_factor=0.5)
        self.register_conditioning(conditioning_key, call_convention=call_convention, dropout=dropout)
        self.model = unet
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, *cond = batch
        loss = self.diffusion_loss(x, cond[0] if cond else None, encode=self.first_stage is not None)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=1e-2)


class Plain(DiffusionMixin, L.LightningModule):
    """A plain DiffusionMixin whose network, ``self.unet``, is a diffusers UNet."""

    denoiser_name = "unet"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.register_schedule(timesteps=T)
        self.unet = unet
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, *cond = batch
        loss = self.diffusion_loss(x, cond[0] if cond else None)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X = randn(B, Z, 4, 4, seed=1)
TS = torch.tensor([0, 5, 11, 19])
CONTEXT = randn(B, 3, CTX, seed=2)
LABELS = torch.tensor([0, 3, 1, 2])


# ------------------------------------------------------------------------------------------------ routing
def _cases() -> dict[str, tuple[Any, Any, Any]]:
    """key -> (unet factory, cond, the direct diffusers call)."""
    concat = randn(B, Z, 4, 4, seed=3)
    vec = randn(B, Y_DIM, seed=4)
    return {
        "none": (unet2d, None, lambda u: u(X, TS).sample),
        "concat": (lambda: unet2d(2 * Z), concat, lambda u: u(torch.cat([X, concat], 1), TS).sample),
        "crossattn": (cond_unet, CONTEXT, lambda u: u(X, TS, encoder_hidden_states=CONTEXT).sample),
        "crossattn-list": (
            cond_unet,
            [CONTEXT[:, :2], CONTEXT[:, 2:]],
            lambda u: u(X, TS, encoder_hidden_states=CONTEXT).sample,
        ),
        "hybrid": (
            lambda: cond_unet(2 * Z),
            {"c_concat": [concat], "c_crossattn": [CONTEXT]},
            lambda u: u(torch.cat([X, concat], 1), TS, encoder_hidden_states=CONTEXT).sample,
        ),
        "adm-labels": (lambda: unet2d(classes=True), LABELS, lambda u: u(X, TS, class_labels=LABELS).sample),
        "adm-vector": (vector_unet, vec, lambda u: u(X, TS, encoder_hidden_states=None, class_labels=vec).sample),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("convention", ["auto", "diffusers"])
def test_apply_model_equals_the_direct_diffusers_call(case: str, convention: str) -> None:
    factory, cond, direct = _cases()[case]
    key = None if case == "none" else case.split("-")[0]
    model = LDM(factory(), key, call_convention=convention).eval()
    with torch.no_grad():
        ours = model.apply_model(X, TS, cond)
        expected = direct(model.model)
        free = apply_conditioned(model.model, X, TS, cond, key, call_convention=convention)
    assert isinstance(ours, Tensor) and ours.shape == (B, Z, 4, 4)
    assert torch.equal(ours, expected)
    assert torch.equal(free, expected)


def test_the_convention_is_read_from_the_signature() -> None:
    assert resolve_call_convention(unet2d()) == "diffusers"  # (sample, timestep, class_labels)
    assert resolve_call_convention(cond_unet()) == "diffusers"
    assert resolve_call_convention(lambda x, t, context=None: x) == "compvis"
    assert resolve_call_convention(lambda x, t: x) == "compvis"
    assert resolve_call_convention(lambda x, t: x, "diffusers") == "diffusers"  # explicit wins


class SameConvention(nn.Module):
    """Not a diffusers model, but with its call convention; returns a ``return_dict=False``-style tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(CTX, Z)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> tuple[Tensor]:
        return (sample * self.lin(encoder_hidden_states.mean(1))[:, :, None, None] + timestep[:, None, None, None],)


def test_a_network_with_the_diffusers_convention_is_called_like_one() -> None:
    net = SameConvention()
    model = LDM(net, "crossattn").eval()
    with torch.no_grad():
        assert torch.equal(model.apply_model(X, TS, CONTEXT), net(X, TS, encoder_hidden_states=CONTEXT)[0])


class Neither(nn.Module):
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    ("key", "cond", "keyword"), [("crossattn", CONTEXT, "context"), ("adm", LABELS, "y"), ("hybrid", None, "context")]
)
def test_a_network_of_neither_convention_gets_a_message_naming_both(key: str, cond: Any, keyword: str) -> None:
    cond = cond if cond is not None else {"c_concat": [X], "c_crossattn": [CONTEXT]}
    model = LDM(Neither(), key)
    both = r"CompVis' model\(x, t, context=.*call_convention='compvis'.*encoder_hidden_states=.*class_labels="
    with pytest.raises(TypeError, match=rf"conditioning_key='{key}' passes the condition as {keyword}= .*{both}"):
        model.apply_model(X, TS, cond)
    assert torch.equal(LDM(Neither(), "concat").apply_model(X, TS, X), torch.cat([X, X], 1))  # no keyword needed


def test_explicit_conventions_that_do_not_fit_the_network_are_refused() -> None:
    with pytest.raises(TypeError, match=r"passes the condition as context= under call_convention='compvis'"):
        LDM(cond_unet(), "crossattn", call_convention="compvis").apply_model(X, TS, CONTEXT)
    with pytest.raises(TypeError, match=r"as encoder_hidden_states= under call_convention='diffusers'.*UNet2DModel"):
        LDM(unet2d(), "crossattn").apply_model(X, TS, CONTEXT)  # UNet2DModel has no cross-attention
    with pytest.raises(ValueError, match=r"call_convention.*'diffusers'"):
        LDM(unet2d(), None, call_convention="diffuser")
    with pytest.raises(ValueError, match=r"call_convention.*'compvis'"):
        apply_conditioned(unet2d(), X, TS, None, None, call_convention="CompVis")


def test_a_class_condition_for_a_unet_without_class_embedding_is_refused() -> None:
    """diffusers ignores ``class_labels`` when the UNet has no class embedding; we refuse instead."""
    with pytest.raises(ValueError, match=r"UNet2DModel has no class embedding .*ignore class_labels"):
        LDM(unet2d(), "adm").apply_model(X, TS, LABELS)
    with pytest.raises(ValueError, match=r"UNet2DConditionModel has no class embedding"):
        LDM(cond_unet(), "adm").apply_model(X, TS, LABELS)


# ------------------------------------------------------------------------------------------------ plain mixin
def test_a_cross_attention_condition_of_the_wrong_shape_is_refused_naming_the_expected_one() -> None:
    model = LDM(cond_unet(), "crossattn")
    expected = rf"takes encoder_hidden_states of shape \(B, sequence, {CTX}\)"
    with pytest.raises(ValueError, match=rf"c_crossattn\) has shape \(4, {CTX}\); UNet2DConditionModel {expected}"):
        model.apply_model(X, TS, CONTEXT[:, 0])  # one vector per sample, no sequence axis
    with pytest.raises(ValueError, match=r"c_crossattn\) has shape \(4, 3, 5\); .*" + expected):
        model.diffusion_loss(X, CONTEXT[..., :5], encode=False)
    with pytest.raises(ValueError, match=r"c_crossattn\) has shape \(4, 3, 5\)"):
        model.sample((B, Z, 4, 4), cond=CONTEXT[..., :5], num_steps=2)
    projected = LDM(cond_unet(encoder_hid_dim=5), "crossattn")  # text_proj: the context is 5 wide, projected to CTX
    assert projected.apply_model(X, TS, CONTEXT[..., :5]).shape == X.shape
    with pytest.raises(ValueError, match=r"c_crossattn\) has shape \(4, 3, 6\); .*\(B, sequence, 5\)"):
        projected.apply_model(X, TS, CONTEXT)


def test_a_sample_shape_of_other_channels_than_the_denoiser_s_is_refused() -> None:
    with_vae = LDM(cond_unet(), "crossattn", vae=tiny_vae())
    with pytest.raises(
        ValueError,
        match=rf"^shape=\(4, 3, 4, 4\) is the shape of the latents, batch first: expected shape\[1\]={Z}, the "
        r"in_channels of UNet2DConditionModel \(the first stage decodes the latents to images\)",
    ):
        with_vae.sample((B, 3, 4, 4), cond=CONTEXT, num_steps=2)  # the image shape instead of the latent one
    assert with_vae.sample((B, Z, 4, 4), cond=CONTEXT, num_steps=2).shape == (B, 3, 4, 4)
    concat = LDM(cond_unet(in_channels=2 * Z), "hybrid")  # concatenated conditions add channels: not checked
    out = concat.sample((B, Z, 4, 4), cond={"c_concat": [X], "c_crossattn": [CONTEXT]}, num_steps=2)
    assert out.shape == (B, Z, 4, 4)


def test_a_named_precision_covers_the_decoding_too() -> None:
    model = LDM(cond_unet(), "crossattn", vae=tiny_vae())
    _fit(model, TensorDataset(randn(B, 3, 4, 4, seed=4), CONTEXT), steps=1)  # bf16-mixed, the Trainer stays attached
    x_T = randn(B, Z, 4, 4, seed=5)

    def run(**kwargs: Any) -> Tensor:
        out = model.sample(x_T.shape, x_T=x_T, cond=CONTEXT, num_steps=2, **kwargs)
        assert isinstance(out, Tensor) and out.shape == (B, 3, 4, 4)
        return out

    as32, attached = run(precision="32-true"), run()
    assert not torch.equal(as32, attached)
    latents = model.sample(x_T.shape, x_T=x_T, cond=CONTEXT, num_steps=2, precision="32-true", decode=False)
    assert torch.equal(as32, model.decode_first_stage(latents))  # decoded in float32 too (no Trainer autocast)
    assert torch.equal(run(precision=32), as32) and torch.equal(run(precision="bf16"), attached)  # short names


def test_the_plain_mixin_calls_a_diffusers_network() -> None:
    with torch.no_grad():
        unet = cond_unet().eval()
        ours = Plain(unet).apply_model(X, TS, CONTEXT)  # a Tensor goes to encoder_hidden_states
        assert torch.equal(ours, unet(X, TS, encoder_hidden_states=CONTEXT).sample)
        spread = Plain(unet).apply_model(X, TS, {"encoder_hidden_states": CONTEXT, "return_dict": False})
        assert torch.equal(spread, ours)  # a mapping is spread; the tuple unwrapped
        classes = unet2d(classes=True).eval()  # no encoder_hidden_states: a Tensor goes to class_labels
        assert torch.equal(Plain(classes).apply_model(X, TS, LABELS), classes(X, TS, class_labels=LABELS).sample)
        plain = unet2d().eval()
        assert torch.equal(Plain(plain).apply_model(X, TS), plain(X, TS).sample)
        # SDXL-style added_cond_kwargs: a nested mapping, spread
        sdxl = cond_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                         projection_class_embeddings_input_dim=6 + 6 * 4).eval()  # fmt: skip
        added = {"text_embeds": randn(B, 6, seed=5), "time_ids": randn(B, 6, seed=6)}
        cond = {"encoder_hidden_states": CONTEXT, "added_cond_kwargs": added}
        expected = sdxl(X, TS, encoder_hidden_states=CONTEXT, added_cond_kwargs=added).sample
        assert torch.equal(Plain(sdxl).apply_model(X, TS, cond), expected)


def test_the_plain_mixin_keeps_its_own_convention_for_other_networks() -> None:
    class CompVisNet(nn.Module):
        def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
            return x, t  # not unwrapped: the compvis convention returns the output as is

    out = Plain(CompVisNet()).apply_model(X, TS, CONTEXT)
    assert isinstance(out, tuple) and out[0] is X
    model = Plain(Neither())
    model.call_convention = "diffusers"
    with pytest.raises(TypeError, match=r"a Tensor cond passes the condition as class_labels= .*Neither.forward"):
        model.apply_model(X, TS, CONTEXT)


# ------------------------------------------------------------------------------------------------ training
def _fit(model: L.LightningModule, data: TensorDataset, steps: int = 3) -> tuple[dict[str, Tensor], L.Trainer]:
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(max_steps=steps, precision="bf16-mixed", callbacks=[DiffusionSeedCallback(seed=3)])
    trainer.fit(model, DataLoader(data, batch_size=B))
    return before, trainer


def _trained(model: L.LightningModule, before: dict[str, Tensor], prefix: str) -> None:
    assert len(model.losses) == 3 and all(torch.isfinite(torch.tensor(model.losses)))  # type: ignore[arg-type]
    changed = [k for k, v in model.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])]
    assert changed, "the UNet's weights did not change"


@pytest.mark.parametrize("with_vae", [False, True])
def test_a_conditional_unet_trains_under_bf16_mixed_and_samples_with_guidance(with_vae: bool) -> None:
    vae = tiny_vae() if with_vae else None
    model = LDM(cond_unet(), "crossattn", vae=vae, dropout=0.2)
    x = randn(2 * B, 3, 4, 4, seed=7) if with_vae else randn(2 * B, Z, 4, 4, seed=7)
    before, _ = _fit(model, TensorDataset(x, randn(2 * B, 3, CTX, seed=8)))
    _trained(model, before, "model.")
    if vae is not None:  # the first stage stayed frozen
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith("first_stage."))
    model.eval()
    shape = (B, Z, 4, 4)
    uncond = torch.zeros(B, 3, CTX)
    for sampler in ("ddim", DPMSolverMultistepScheduler.from_config(model.noise_schedule.to_diffusers_config())):
        out = model.sample(shape, cond=CONTEXT, uncond=uncond, guidance_scale=3.0, num_steps=3, sampler=sampler,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.shape == ((B, 3, 4, 4) if with_vae else shape) and torch.isfinite(out).all()  # type: ignore[union-attr]


def test_a_class_conditional_unet2d_trains_as_the_plain_mixins_network() -> None:
    model = Plain(unet2d(classes=True))
    before, _ = _fit(model, TensorDataset(randn(2 * B, Z, 4, 4, seed=9), torch.arange(2 * B) % NUM_CLASSES))
    _trained(model, before, "unet.")
    out = model.eval().sample((B, Z, 4, 4), num_steps=3, cond=LABELS)
    assert out.shape == (B, Z, 4, 4) and torch.isfinite(out).all()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ sampling
def _pipeline_loop(unet: nn.Module, scheduler: Any, noise: Tensor, cond: Tensor, uncond: Tensor, steps: int) -> Tensor:
    """What a diffusers pipeline does: both branches as one batch (uncond first), guidance, ``scheduler.step``."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    pair = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t.expand(2 * x.shape[0]), encoder_hidden_states=pair).sample
        out_u, out_c = out.float().chunk(2)
        x = scheduler.step(out_u + 3.0 * (out_c - out_u), t, x).prev_sample
    return x


def test_guided_sampling_equals_a_pipeline_loop_calling_the_unet() -> None:
    model = LDM(cond_unet(), "crossattn").eval()
    x_T, uncond = randn(B, Z, 4, 4, seed=10), randn(B, 3, CTX, seed=11)
    config = model.noise_schedule.to_diffusers_config()  # type: ignore[union-attr]
    kwargs = {"cond": CONTEXT, "uncond": uncond, "guidance_scale": 3.0, "x_T": x_T, "num_steps": 5}
    with torch.no_grad():
        dpm = DPMSolverMultistepScheduler.from_config(config)
        ours = model.sample(x_T.shape, sampler=dpm, **kwargs)
        theirs = _pipeline_loop(model.model, DPMSolverMultistepScheduler.from_config(config), x_T, CONTEXT, uncond, 5)
        assert torch.equal(ours, theirs)  # type: ignore[arg-type]
        # our DDIM ("uniform" steps) is diffusers' DDIM with "leading" spacing and steps_offset=1, on our ā
        ddim = DDIMScheduler(**config, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                             clip_sample=False)  # fmt: skip
        ddim.alphas_cumprod = model.noise_schedule.table("alphas_cumprod").clone()  # type: ignore[union-attr]
        ddim.final_alpha_cumprod = ddim.alphas_cumprod[0]
        ours = model.sample(x_T.shape, **kwargs)
        theirs = _pipeline_loop(model.model, ddim, x_T, CONTEXT, uncond, 5)
    diff, size = float((ours - theirs).abs().max()), float(theirs.abs().max())  # type: ignore[operator]
    assert diff <= 2e-6 * size, diff  # float32 rounding: our DDIM step is written in another order
