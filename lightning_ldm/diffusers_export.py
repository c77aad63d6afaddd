r"""A trained latent diffusion model as a diffusers pipeline folder, and a diffusers folder as the parts of a module.

:func:`export_diffusers` writes what diffusers' ``StableDiffusionPipeline`` loads (offline, without a text encoder:
the conditions are given as embeddings)::

    export_diffusers(model, "exported/")  # unet/, vae/, scheduler/, model_index.json

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("exported/", text_encoder=None, tokenizer=None)
    images = pipe(prompt_embeds=context, negative_prompt_embeds=null, latents=x_T, num_inference_steps=50,
                  guidance_scale=5.0, output_type="pt").images  # (model.sample(...) + 1) / 2, clamped to [0, 1]

The VAE's ``config.scaling_factor`` is the first stage's factor *in use* (the fitted one with ``scale_by_std``,
which otherwise lives only in the Lightning checkpoint), the UNet's weights are the averaged ones of Lightning's
``EMAWeightAveraging`` when a Trainer with one is attached, and the scheduler is built from the model's noise
schedule. :func:`load_diffusers` reads such a folder (or any diffusers folder with ``unet/``, ``vae/`` and
``scheduler/``) back, with the schedule checked against the scheduler's own tables, to fine-tune.

diffusers is an optional dependency (``pip install "lightning_ldm[diffusers]"``); it is imported when these
functions run, never when the package is imported. Loading the folder with ``StableDiffusionPipeline`` also needs
``transformers``, which diffusers requires for that class; :func:`export_diffusers` and :func:`load_diffusers` do not.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_ldm._checks import check_bool, check_instance, check_mapping, check_scheduler, describe
from lightning_ldm.call_convention import resolve_call_convention
from lightning_ldm.noise_schedule import NoiseSchedule

if TYPE_CHECKING:
    from lightning_ldm.first_stage import FirstStage
    from lightning_ldm.latent import LatentDiffusionMixin

__all__ = [
    "DDIM_EXPORT_OPTIONS",
    "PIPELINE_SCHEDULER_OPTIONS",
    "DiffusersComponents",
    "export_diffusers",
    "load_diffusers",
]

INSTALL_HINT = 'pip install "lightning_ldm[diffusers]"'

#: What ``StableDiffusionPipeline`` forces on its scheduler's config when it loads (it rewrites other values, with a
#: deprecation warning): written into every exported scheduler config whose class takes the key.
PIPELINE_SCHEDULER_OPTIONS: Mapping[str, Any] = {"clip_sample": False, "steps_offset": 1}

#: The sampling options written into an exported ``DDIMScheduler`` config: with them diffusers' DDIM takes the steps
#: of our ``sample(sampler="ddim", method="uniform")`` (CompVis' DDIM: timesteps ``0, T/S, 2T/S, ... + 1``, the last
#: step to ``ā_0``, no clipping), as Stable Diffusion's scheduler config does.
DDIM_EXPORT_OPTIONS: Mapping[str, Any] = {
    **PIPELINE_SCHEDULER_OPTIONS,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}

_PIPELINE = "StableDiffusionPipeline"
#: The components of ``StableDiffusionPipeline`` that an export leaves empty (``null`` in ``model_index.json``).
_EMPTY_COMPONENTS = ("feature_extractor", "image_encoder", "safety_checker", "text_encoder", "tokenizer")


def _diffusers() -> Any:
    """The ``diffusers`` module, or ``ModuleNotFoundError`` with the install command."""
    try:
        return importlib.import_module("diffusers")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"exporting to and loading from diffusers folders needs diffusers: {INSTALL_HINT}"
        ) from err


def _averaged_denoiser(module: nn.Module, name: str) -> nn.Module | None:
    """The averaged copy of ``module.<name>`` held by the attached Trainer's ``WeightAveraging``, if it has averaged."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    from lightning_ldm.callbacks._sampling import first_averaged_module

    averaged, _ = first_averaged_module(trainer)
    denoiser = None if averaged is None else getattr(averaged, name, None)
    return denoiser if isinstance(denoiser, nn.Module) else None


def _scheduler_class(diffusers: Any, scheduler: Any) -> Any:
    if isinstance(scheduler, str):
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(
                f"scheduler={scheduler!r} is not a diffusers scheduler class; expected a name such as "
                "'DDIMScheduler', 'DPMSolverMultistepScheduler', 'EulerDiscreteScheduler', or the class itself"
            )
        return cls
    if isinstance(scheduler, type) and hasattr(scheduler, "from_config") and hasattr(scheduler, "save_pretrained"):
        return scheduler
    raise TypeError(
        f"scheduler must be a diffusers scheduler class or its name, got {describe(scheduler)} of type "
        f"{type(scheduler).__name__}"
    )


def _build_scheduler(diffusers: Any, scheduler: Any, schedule: NoiseSchedule, options: Mapping[str, Any]) -> Any:
    """The scheduler of ``schedule`` with the sampling ``options`` its class takes, checked against the schedule."""
    cls = _scheduler_class(diffusers, scheduler)
    defaults = DDIM_EXPORT_OPTIONS if cls.__name__ == "DDIMScheduler" else PIPELINE_SCHEDULER_OPTIONS
    config = {**defaults, **schedule.to_diffusers_config(), **options}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(f"scheduler_options has key(s) {unknown} that {cls.__name__} does not take")
    forced = {k: options[k] for k, v in PIPELINE_SCHEDULER_OPTIONS.items() if k in options and options[k] != v}
    if forced:
        raise ValueError(
            f"scheduler_options={forced} would be rewritten by {_PIPELINE} when it loads; it needs "
            f"{dict(PIPELINE_SCHEDULER_OPTIONS)}"
        )
    built = cls.from_config({k: v for k, v in config.items() if k in accepted})
    check_scheduler(built, schedule)
    return built


def _check_exportable(given: nn.Module, diffusers: Any) -> tuple[LatentDiffusionMixin, nn.Module, FirstStage]:
    """``(module, denoiser, first stage)`` of a module :func:`export_diffusers` can write, or the error why not."""
    from lightning_ldm.latent import LatentDiffusionMixin

    module: LatentDiffusionMixin = check_instance(
        "module", given, LatentDiffusionMixin, "a LatentDiffusionMixin module"
    )
    name = module.denoiser_name or "model"
    denoiser = getattr(module, name, None)
    if not isinstance(denoiser, diffusers.UNet2DConditionModel):
        raise TypeError(
            f"module.{name} (the denoiser) must be a diffusers UNet2DConditionModel to be exported as a "
            f"{_PIPELINE}, got {type(denoiser).__name__}"
        )
    if module.conditioning_key != "crossattn":
        raise ValueError(
            f"{_PIPELINE} conditions the UNet by cross-attention only; the module's conditioning_key="
            f"{module.conditioning_key!r} cannot be exported as one (expected 'crossattn')"
        )
    if resolve_call_convention(denoiser, module.call_convention) != "diffusers":
        raise ValueError(
            f"module.call_convention={module.call_convention!r} does not call the UNet as diffusers does "
            "(encoder_hidden_states=); the pipeline would run it differently"
        )
    stage = module.first_stage
    if stage is None or not isinstance(stage.autoencoder, diffusers.AutoencoderKL):
        got = "no first stage" if stage is None else type(stage.autoencoder).__name__
        raise TypeError(f"the module's first stage must wrap a diffusers AutoencoderKL to be exported, got {got}")
    if stage.shift:
        raise ValueError(
            f"the first stage has shift_factor={stage.shift!r}, but {_PIPELINE} decodes latents / scaling_factor "
            "without a shift; only a first stage with shift_factor 0 can be exported"
        )
    return module, denoiser, stage


def export_diffusers(
    module: nn.Module,
    path: str | Path,
    *,
    scheduler: Any = "DDIMScheduler",
    scheduler_options: Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> Path:
    """Write ``module`` as a diffusers ``StableDiffusionPipeline`` folder that loads offline.

    The folder holds ``unet/`` (the denoiser's ``save_pretrained``), ``vae/`` (a copy of the first stage's
    ``AutoencoderKL`` whose ``config.scaling_factor`` is the factor in use, :attr:`FirstStage.scale`: the fitted one
    with ``scale_by_std``), ``scheduler/`` (``scheduler`` built from ``module.noise_schedule.to_diffusers_config()``
    and checked against the schedule's tables) and ``model_index.json`` with empty text encoder, tokenizer, safety
    checker and feature extractor: load it with ``StableDiffusionPipeline.from_pretrained(path, text_encoder=None,
    tokenizer=None)`` (or ``DiffusionPipeline``) and give the conditions as ``prompt_embeds=`` and, for guidance,
    ``negative_prompt_embeds=`` (the null condition). The module is not changed.

    Which UNet weights: with ``use_ema`` and a Trainer attached whose ``WeightAveraging`` callback (Lightning's
    ``EMAWeightAveraging``) has averaged, its averaged weights (what ``SampleLogger`` samples with); otherwise the
    module's own. After ``trainer.fit`` the module's own weights are the averaged ones (Lightning copies them in at
    the end of training), so both choices agree then.

    Args:
        module: A :class:`~lightning_ldm.latent.LatentDiffusionMixin` with ``conditioning_key="crossattn"``, a
            diffusers ``UNet2DConditionModel`` as its denoiser and a first stage that wraps a diffusers
            ``AutoencoderKL`` with no shift.
        path: The folder to write (created; files already there are overwritten).
        scheduler: A diffusers scheduler class or its name. ``"DDIMScheduler"`` gets :data:`DDIM_EXPORT_OPTIONS`, so
            that the pipeline's default sampler takes our DDIM's steps; every class gets
            :data:`PIPELINE_SCHEDULER_OPTIONS` where it takes them.
        scheduler_options: Sampling options of the scheduler's config (``timestep_spacing``, ...), written over the
            defaults; the keys that define the schedule come from the module and are checked, and the values the
            pipeline would rewrite (:data:`PIPELINE_SCHEDULER_OPTIONS`) are refused.
        use_ema: Export the averaged weights when a Trainer's weight averaging has them.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ModuleNotFoundError: diffusers is not installed.
        TypeError: ``module`` is not a ``LatentDiffusionMixin``, its denoiser is not a ``UNet2DConditionModel`` or its
            first stage not an ``AutoencoderKL``; ``scheduler`` is not a scheduler class or name; a wrong option type.
        ValueError: The conditioning is not cross-attention, the first stage has a shift, an unknown scheduler name
            or option, an option the pipeline would rewrite, or options that change the schedule (the built
            scheduler's tables differ from the module's).
    """
    diffusers = _diffusers()
    use_ema = check_bool("use_ema", use_ema)
    check_mapping("scheduler_options", {} if scheduler_options is None else scheduler_options, "a mapping")
    latent, denoiser, stage = _check_exportable(module, diffusers)
    schedule = latent._require_schedule()
    built = _build_scheduler(diffusers, scheduler, schedule, dict(scheduler_options or {}))

    averaged = _averaged_denoiser(latent, latent.denoiser_name or "model") if use_ema else None
    unet: Any = averaged if averaged is not None else denoiser  # diffusers ModelMixins; saving changes nothing
    vae: Any = copy.deepcopy(stage.autoencoder)  # never change the user's VAE config
    vae.register_to_config(scaling_factor=stage.scale)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    built.save_pretrained(out / "scheduler")
    index: dict[str, Any] = {
        "_class_name": _PIPELINE,
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        "scheduler": ["diffusers", type(built).__name__],
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }
    index.update({name: [None, None] for name in _EMPTY_COMPONENTS})
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return out


@dataclass(frozen=True)
class DiffusersComponents:
    """What :func:`load_diffusers` reads: the parts a module is built from.

    Attributes:
        unet: The denoiser (``self.model = unet``).
        vae: The autoencoder, whose ``config.scaling_factor`` the first stage takes
            (``self.register_first_stage(vae)``).
        schedule: The noise schedule of the scheduler's config (``self.register_schedule(schedule=schedule)``),
            checked against the scheduler's own ``alphas_cumprod``.
        scheduler: The loaded scheduler (a sampler for ``sample(sampler=...)``).
    """

    unet: nn.Module
    vae: nn.Module
    schedule: NoiseSchedule
    scheduler: Any


def _component_class(diffusers: Any, folder: Path, name: str, index: Mapping[str, Any]) -> Any:
    entry = index.get(name)
    class_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else None
    config_file = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {name}/ component ({config_file.name} is missing)")
    if class_name is None:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{folder}'s {name} has class {class_name!r}, which diffusers does not have")
    return cls


def load_diffusers(path: str | Path) -> DiffusersComponents:
    """Read a local diffusers folder (``unet/``, ``vae/``, ``scheduler/``) as the parts of a latent diffusion module.

    Offline (``local_files_only``). The classes come from ``model_index.json``, or each component's config where
    there is none. Build a module from them::

        parts = load_diffusers("exported/")

        class LDM(LatentDiffusionMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.register_schedule(schedule=parts.schedule)
                self.register_first_stage(parts.vae)  # scale_factor = vae.config.scaling_factor
                self.register_conditioning("crossattn")
                self.model = parts.unet

    Args:
        path: The folder (e.g. one written by :func:`export_diffusers`).

    Returns:
        The :class:`DiffusersComponents`.

    Raises:
        ModuleNotFoundError: diffusers is not installed.
        FileNotFoundError: ``path`` is not a folder or lacks a component.
        ValueError: A component's class is not in diffusers, or the schedule read from the scheduler's config
            differs from the scheduler's own tables (message from :func:`~lightning_ldm._checks.check_scheduler`).
    """
    diffusers = _diffusers()
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path={str(path)!r} is not a folder; expected a diffusers pipeline folder")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    parts = {
        name: _component_class(diffusers, folder, name, index).from_pretrained(
            folder, subfolder=name, local_files_only=True
        )
        for name in ("unet", "vae", "scheduler")
    }
    scheduler = parts["scheduler"]
    schedule = NoiseSchedule.from_diffusers_config(dict(scheduler.config))
    check_scheduler(scheduler, schedule)
    return DiffusersComponents(unet=parts["unet"], vae=parts["vae"], schedule=schedule, scheduler=scheduler)
