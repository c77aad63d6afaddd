"""export_diffusers / load_diffusers: a trained latent model as a diffusers StableDiffusionPipeline folder and back.

The reference is diffusers itself: ``StableDiffusionPipeline.from_pretrained`` loads the exported folder offline and
its images are compared with ``module.sample(...)`` for the same noise, conditions and scheduler. Tiny random-init
models (tests/test_latent_diffusers.py's builders), nothing downloaded. diffusers and transformers (which diffusers
needs for StableDiffusionPipeline) are declared test dependencies, imported plainly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks import DiffusionSeedCallback, SampleLogger
from lightning_ldm.diffusers_export import DDIM_EXPORT_OPTIONS, export_diffusers, load_diffusers
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.schedule_config import ScheduleConfig
from tests.lightning_helpers import make_trainer
from tests.test_latent_diffusers import CTX, Z, cond_unet, tiny_vae, unet2d

T = 100
SIZE = 8  # image and latent side: the pipeline wants multiples of 8; the tiny VAE keeps the size
B = 4
TOKENS = 3
STEPS = 10
GUIDANCE = 3.0


class ExportLDM(LatentDiffusionMixin, L.LightningModule):
    """The Done-when model: a diffusers UNet with cross-attention on a diffusers VAE, ``scale_by_std``, dropout."""

    def __init__(self, unet: nn.Module | None = None, vae: nn.Module | None = None, **stage: Any) -> None:
        super().__init__()
        self.register_schedule(beta_schedule="linear", timesteps=T, linear_start=0.00085, linear_end=0.012)
        self.register_first_stage(tiny_vae() if vae is None else vae, **stage)
        self.register_conditioning("crossattn", dropout=0.25)
        self.model = cond_unet(size=SIZE) if unet is None else unet

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, context = batch
        return self.diffusion_loss(images, context)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=1e-2)


def _data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    context = torch.randn(n, TOKENS, CTX, generator=g)
    return DataLoader(TensorDataset(images, context), batch_size=B)


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    """``(x_T, cond, uncond)`` for B samples: the null condition is zeros, the model's dropout null."""
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(B, Z, SIZE, SIZE, generator=g)
    return x_T, torch.randn(B, TOKENS, CTX, generator=g), torch.zeros(B, TOKENS, CTX)


def _pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(path, text_encoder=None, tokenizer=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe: Any, x_T: Tensor, cond: Tensor, uncond: Tensor, **options: Any) -> Tensor:  # noqa: N803
    out = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=x_T,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="pt",
        **options,
    )
    return out.images


def _as_pipeline_output(images: Tensor) -> Tensor:
    """diffusers' postprocessing of decoded images in [-1, 1]: ``(x / 2 + 0.5).clamp(0, 1)``."""
    return (images / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ the Done-when run
def test_trained_bf16_ema_model_exports_and_the_pipeline_samples_what_sample_samples(tmp_path):
    model = ExportLDM(scale_by_std=True)
    logger = SampleLogger(
        (2, Z, SIZE, SIZE),
        every_n_steps=15,
        at_validation_end=False,
        # YAML-able conditions: nested lists become tensors
        cond=[[[0.5] * CTX] * TOKENS, [[-0.5] * CTX] * TOKENS],
        uncond=[[[0.0] * CTX] * TOKENS] * 2,
        sample_kwargs={"num_steps": 5, "guidance_scale": 2.0},
    )
    trainer = make_trainer(
        max_steps=30,
        precision="bf16-mixed",
        default_root_dir=tmp_path / "run",
        callbacks=[DiffusionSeedCallback(seed=0), EMAWeightAveraging(decay=0.9), logger],
    )
    initial_unet = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer.fit(model, _data())

    assert trainer.global_step == 30
    assert logger.last_weights == "averaged" and logger.last_samples is not None
    assert logger.last_samples.shape == (2, 3, SIZE, SIZE) and bool(logger.last_samples.isfinite().all())
    scale = model.first_stage.scale
    assert model.first_stage.is_scale_fitted and scale != 1.0

    path = export_diffusers(model, tmp_path / "export")
    assert sorted(p.name for p in path.iterdir()) == ["model_index.json", "scheduler", "unet", "vae"]
    # the fitted factor travels in the VAE's config; the user's VAE keeps its own
    assert json.loads((path / "vae" / "config.json").read_text())["scaling_factor"] == scale
    assert model.first_stage.autoencoder.config.scaling_factor == 0.18215
    # the exported UNet holds the EMA weights (Lightning copies them into the module at the end of fit)
    averaged = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))._average_model.module
    pipe = _pipeline(path)
    assert isinstance(pipe, StableDiffusionPipeline)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, averaged.model.state_dict()[key]), key
    assert any(not torch.equal(v, initial_unet[k]) for k, v in pipe.unet.state_dict().items())

    # float32 on the CPU, without the Trainer's bf16 autocast: the pipeline's images are sample()'s, bitwise
    model.trainer = None
    x_T, cond, uncond = _inputs()
    ours = model.sample(
        x_T.shape,
        x_T=x_T,
        cond=cond,
        uncond=uncond,
        guidance_scale=GUIDANCE,
        num_steps=STEPS,
        sampler=DDIMScheduler.from_config(pipe.scheduler.config),
    )
    theirs = _pipeline_images(pipe, x_T, cond, uncond)
    assert theirs.shape == (B, 3, SIZE, SIZE)
    assert torch.equal(theirs, _as_pipeline_output(ours))
    assert float(theirs.std()) > 0.05  # not a constant image

    # the exported DDIM config takes the steps of our own DDIM (CompVis' uniform spacing): equal to float32 rounding
    # (measured 3.6e-7, 3 ulp at 1.0: the two DDIM updates order their float32 operations differently)
    ddim = model.sample(x_T.shape, x_T=x_T, cond=cond, uncond=uncond, guidance_scale=GUIDANCE, num_steps=STEPS)
    torch.testing.assert_close(theirs, _as_pipeline_output(ddim), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ which weights
class _ExportAt(Callback):
    """Export with and without EMA after the training batch of step ``step``, while the weights still differ."""

    def __init__(self, root: Path, step: int) -> None:
        self.root, self.step = root, step
        self.training: dict[str, Tensor] = {}
        self.averaged: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            export_diffusers(pl_module, self.root / "ema")
            export_diffusers(pl_module, self.root / "training", use_ema=False)
            self.training = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            average = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))._average_model.module
            self.averaged = {k: v.clone() for k, v in average.model.state_dict().items()}


def _unet_weights(path: Path) -> dict[str, Tensor]:
    return load_diffusers(path).unet.state_dict()


def test_mid_training_export_takes_the_averaged_weights_unless_told_not_to(tmp_path):
    model = ExportLDM()
    probe = _ExportAt(tmp_path, step=3)
    make_trainer(max_steps=4, callbacks=[DiffusionSeedCallback(seed=0), EMAWeightAveraging(decay=0.5), probe]).fit(
        model, _data()
    )
    ema, training = _unet_weights(tmp_path / "ema"), _unet_weights(tmp_path / "training")
    assert all(torch.equal(ema[k], probe.averaged[k]) for k in ema)
    assert all(torch.equal(training[k], probe.training[k]) for k in training)
    assert any(not torch.equal(ema[k], training[k]) for k in ema)


def test_without_a_trainer_the_module_weights_are_exported(tmp_path):
    model = ExportLDM(scale_factor=0.37)
    weights = _unet_weights(export_diffusers(model, tmp_path))
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in weights.items())
    assert load_diffusers(tmp_path).vae.config.scaling_factor == pytest.approx(0.37, abs=0)


# ------------------------------------------------------------------------------------------------ the way back
def test_round_trip_gives_the_same_weights_scale_schedule_and_samples(tmp_path):
    model = ExportLDM(scale_factor=0.61)
    with torch.no_grad():  # away from the random init, so the weights tell something
        for p in model.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_diffusers(model, tmp_path)
    parts = load_diffusers(tmp_path)
    rebuilt = ExportLDM(unet=parts.unet, vae=parts.vae)
    rebuilt.register_schedule(schedule=parts.schedule)

    assert rebuilt.first_stage.scale == model.first_stage.scale == 0.61
    assert rebuilt.noise_schedule.fingerprint == model.noise_schedule.fingerprint
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert {k: parts.scheduler.config[k] for k in DDIM_EXPORT_OPTIONS} == dict(DDIM_EXPORT_OPTIONS)

    x_T, cond, uncond = _inputs()
    options = {"x_T": x_T, "cond": cond, "uncond": uncond, "guidance_scale": GUIDANCE, "num_steps": STEPS}
    assert torch.equal(model.sample(x_T.shape, **options), rebuilt.sample(x_T.shape, **options))


def test_another_scheduler_class_with_options_is_written_and_samples_alike(tmp_path):
    model = ExportLDM(scale_factor=0.5)
    options = {"timestep_spacing": "leading"}  # where steps_offset counts
    export_diffusers(model, tmp_path, scheduler=EulerDiscreteScheduler, scheduler_options=options)
    exported = load_diffusers(tmp_path).scheduler
    pipe = _pipeline(tmp_path)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    # written as the pipeline wants it: it loads it unchanged (it would rewrite steps_offset=0, Euler's default)
    assert exported.config.steps_offset == 1 and exported.config.timestep_spacing == "leading"
    assert dict(pipe.scheduler.config) == dict(exported.config)
    x_T, cond, uncond = _inputs()
    ours = model.sample(
        x_T.shape, x_T=x_T, cond=cond, uncond=uncond, guidance_scale=GUIDANCE, num_steps=STEPS, sampler=exported
    )
    assert torch.equal(_pipeline_images(pipe, x_T, cond, uncond), _as_pipeline_output(ours))


def test_a_v_prediction_schedule_travels_as_prediction_type(tmp_path):
    model = ExportLDM()
    model.register_schedule(timesteps=T, parameterization="v", zero_terminal_snr=True)
    export_diffusers(model, tmp_path)
    parts = load_diffusers(tmp_path)
    assert parts.scheduler.config.prediction_type == "v_prediction"
    assert parts.schedule.fingerprint == model.noise_schedule.fingerprint


# ------------------------------------------------------------------------------------------------ refusals
class _Plain(DiffusionMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_schedule(timesteps=T)
        self.model = cond_unet(size=SIZE)


def test_refuses_what_the_pipeline_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match=r"module must be .*LatentDiffusionMixin.*_Plain"):
        export_diffusers(_Plain(), tmp_path)
    model = ExportLDM(unet=unet2d(size=SIZE))
    with pytest.raises(
        TypeError,
        match=r"module\.model \(the denoiser\) must be a diffusers UNet2DConditionModel.*"
        r"got UNet2DModel",
    ):
        export_diffusers(model, tmp_path)
    model = ExportLDM()
    model.register_conditioning("concat")
    with pytest.raises(ValueError, match=r"conditioning_key='concat' cannot be exported.*expected 'crossattn'"):
        export_diffusers(model, tmp_path)
    model = ExportLDM(shift_factor=0.25)
    with pytest.raises(ValueError, match=r"shift_factor=0\.25.*decodes latents / scaling_factor without a shift"):
        export_diffusers(model, tmp_path)
    model = ExportLDM()
    model.register_first_stage(_Coder())
    with pytest.raises(TypeError, match=r"first stage must wrap a diffusers AutoencoderKL.*got _Coder"):
        export_diffusers(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


class _Coder(nn.Module):
    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


def test_refuses_bad_scheduler_arguments(tmp_path):
    model = ExportLDM()
    with pytest.raises(ValueError, match=r"scheduler='NoSuchScheduler' is not a diffusers scheduler class"):
        export_diffusers(model, tmp_path, scheduler="NoSuchScheduler")
    with pytest.raises(TypeError, match=r"scheduler must be a diffusers scheduler class or its name, got 3"):
        export_diffusers(model, tmp_path, scheduler=3)
    with pytest.raises(ValueError, match=r"scheduler_options has key\(s\) \['no_such_option'\] that DDIMScheduler"):
        export_diffusers(model, tmp_path, scheduler_options={"no_such_option": 1})
    # an option that changes the schedule is caught by the table check
    with pytest.raises(ValueError, match=r"DDIMScheduler's alphas_cumprod differs from the model's schedule"):
        export_diffusers(model, tmp_path, scheduler_options={"beta_end": 0.02})
    with pytest.raises(
        ValueError,
        match=r"scheduler_options=\{'steps_offset': 0\} would be rewritten by "
        r"StableDiffusionPipeline",
    ):
        export_diffusers(model, tmp_path, scheduler_options={"steps_offset": 0})
    with pytest.raises(TypeError, match=r"scheduler_options must be a mapping"):
        export_diffusers(model, tmp_path, scheduler_options=[1])
    with pytest.raises(TypeError, match=r"use_ema must be a bool"):
        export_diffusers(model, tmp_path, use_ema="yes")


def test_load_refuses_missing_folders_and_components(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a folder; expected a diffusers pipeline folder"):
        load_diffusers(tmp_path / "absent")
    export_diffusers(ExportLDM(), tmp_path)
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no vae/ component \(config\.json is missing\)"):
        load_diffusers(tmp_path)


def test_load_refuses_a_component_class_diffusers_does_not_have(tmp_path):
    export_diffusers(ExportLDM(), tmp_path)
    config_file = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "NoSuchScheduler"
    config_file.write_text(json.dumps(config))
    (tmp_path / "model_index.json").unlink()  # the class is then read from the component's config
    with pytest.raises(ValueError, match=r"scheduler has class 'NoSuchScheduler', which diffusers does not have"):
        load_diffusers(tmp_path)


def test_missing_diffusers_names_the_extra(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def fake(name: str, *args: Any) -> Any:
        if name == "diffusers":
            raise ModuleNotFoundError("No module named 'diffusers'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning_ldm\[diffusers\]"'):
        export_diffusers(ExportLDM(), tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning_ldm\[diffusers\]"'):
        load_diffusers(tmp_path)


def test_model_index_is_the_one_diffusers_writes_and_its_folders_load(tmp_path):
    """The reference: the same components saved by diffusers' own ``StableDiffusionPipeline.save_pretrained``."""
    model = ExportLDM(scale_factor=0.4)
    export_diffusers(model, tmp_path / "ours")
    parts = load_diffusers(tmp_path / "ours")
    reference = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=None,
        tokenizer=None,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / d / "model_index.json").read_text()) for d in ("ours", "theirs"))
    assert ours == theirs
    loaded = load_diffusers(tmp_path / "theirs")
    assert loaded.vae.config.scaling_factor == 0.4
    assert loaded.schedule.fingerprint == model.noise_schedule.fingerprint
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in loaded.unet.state_dict().items())


def test_load_checks_the_schedule_against_the_schedulers_tables(tmp_path, monkeypatch):
    export_diffusers(ExportLDM(), tmp_path)
    misread = NoiseSchedule(ScheduleConfig(beta_schedule="linear", timesteps=T, linear_start=0.00085, linear_end=0.02))
    monkeypatch.setattr(NoiseSchedule, "from_diffusers_config", classmethod(lambda cls, config: misread))
    with pytest.raises(ValueError, match=r"DDIMScheduler's alphas_cumprod differs from the model's schedule: at t="):
        load_diffusers(tmp_path)
