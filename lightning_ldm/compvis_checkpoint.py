"""CompVis ``LatentDiffusion`` state dicts in and out of a ``CompVisCompat`` latent diffusion module.

CompVis' ``LatentDiffusion`` keeps the denoiser under ``model.diffusion_model.*`` (its ``DiffusionWrapper``), the
autoencoder under ``first_stage_model.*``, the condition encoder under ``cond_stage_model.*``, twelve float32
schedule buffers (``betas`` ... ``posterior_mean_coef2``; ``lvlb_weights`` is not persistent), ``scale_factor``
(a buffer only with ``scale_by_std=True``) and, with ``use_ema=True``, ``LitEma``'s ``model_ema.decay``,
``model_ema.num_updates`` and one shadow per trainable denoiser parameter, named by its path under ``model`` with
the dots removed (``model_ema.diffusion_modelout2bias``)::

    model.load_state_dict(from_compvis_state_dict(model, torch.load("last.ckpt")["state_dict"]))
    compvis.load_state_dict(to_compvis_state_dict(model, use_ema=True), strict=True)

Here the denoiser is ``getattr(module, denoiser_name)`` (``model``, or ``model.diffusion_model`` when held by
:class:`~lightning_ldm.compat.DiffusionModelHolder`), the autoencoder ``first_stage.autoencoder`` with its scale in
``first_stage.scale_factor``, and the condition encoder ``cond_stage_model`` (``register_cond_stage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ldm._checks import check_bool
from lightning_ldm.callbacks._sampling import first_averaged_module
from lightning_ldm.compat import CompVisCompat, DiffusionModelHolder
from lightning_ldm.first_stage import FirstStage
from lightning_ldm.noise_schedule import SCHEDULE_TABLES

__all__ = ["COMPVIS_TABLES", "from_compvis_state_dict", "to_compvis_state_dict"]

#: The schedule buffers a CompVis ``LatentDiffusion`` state dict holds (``lvlb_weights`` is not persistent there).
COMPVIS_TABLES: tuple[str, ...] = tuple(n for n in SCHEDULE_TABLES if n not in ("snr_table", "lvlb_weights"))

_DENOISER = "model.diffusion_model."
_FIRST_STAGE = "first_stage_model."
_EMA = "model_ema."
#: LitEma's default decay, written when no averaging callback is known.
_LITEMA_DECAY = 0.9999


def _parts(module: Any) -> tuple[nn.Module, str, FirstStage]:
    """The denoiser, its key prefix in ``module.state_dict()``, and the first stage; refuse other modules."""
    if not isinstance(module, CompVisCompat) or not isinstance(module, nn.Module):
        raise TypeError(
            f"module must be a CompVisCompat latent diffusion module (class M(CompVisCompat, LatentDiffusionMixin, "
            f"L.LightningModule)), got {type(module).__name__}"
        )
    stage = getattr(module, "first_stage", None)
    name = getattr(module, "denoiser_name", None)
    denoiser = getattr(module, name, None) if isinstance(name, str) else None
    if not isinstance(stage, FirstStage) or not isinstance(denoiser, nn.Module):
        raise ValueError(
            f"{type(module).__name__} needs a first stage (register_first_stage) and a denoiser module at "
            f"denoiser_name={name!r} to map a CompVis LatentDiffusion state dict"
        )
    if isinstance(denoiser, DiffusionModelHolder):
        return denoiser.diffusion_model, f"{name}.diffusion_model.", stage
    return denoiser, f"{name}.", stage


def _shadow_name(parameter_name: str) -> str:
    """LitEma's buffer name of ``model.diffusion_model.<parameter_name>``: the path under ``model``, dots removed."""
    return _EMA + ("diffusion_model." + parameter_name).replace(".", "")


def from_compvis_state_dict(module: Any, state_dict: Mapping[str, Any], *, use_ema: bool = False) -> dict[str, Any]:
    """Rename a CompVis ``LatentDiffusion`` state dict to ``module``'s keys; load it with ``module.load_state_dict``.

    ``model.diffusion_model.*`` goes to the denoiser, ``first_stage_model.*`` to ``first_stage.autoencoder.*``,
    ``scale_factor`` to ``first_stage.scale_factor`` (with ``scale_by_std`` it is restored as a fitted factor, not
    refitted; a fixed factor must equal it; without the key, as CompVis saves it without ``scale_by_std``, the first
    stage keeps its factor and its fitted state). ``cond_stage_model.*`` and the schedule tables keep their keys:
    loading compares each table with the registered schedule (a differing one is a load error) and the condition
    encoder's weights load into ``cond_stage_model``. Other keys are left as they are (``load_state_dict``
    reports them).

    Args:
        module: A ``CompVisCompat`` + ``LatentDiffusionMixin`` module with a first stage and a denoiser.
        state_dict: CompVis' state dict (``torch.load(path)["state_dict"]``).
        use_ema: Load the ``model_ema.*`` shadows as the denoiser's weights (what CompVis samples with in
            ``ema_scope``). ``False`` drops ``model_ema.*``. Lightning's ``EMAWeightAveraging`` starts its average
            from the weights loaded.

    Returns:
        A new state dict (the tensors are shared, not copied).

    Raises:
        TypeError: ``module`` is not a ``CompVisCompat`` module; ``use_ema`` is not a bool.
        ValueError: ``module`` lacks a first stage or denoiser; ``use_ema=True`` and the state dict has no shadow for
            one of the denoiser's trainable parameters.
    """
    use_ema = check_bool("use_ema", use_ema)
    denoiser, prefix, stage = _parts(module)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(_EMA):
            continue
        if key.startswith(_DENOISER):
            out[prefix + key[len(_DENOISER) :]] = value
        elif key.startswith(_FIRST_STAGE):
            out["first_stage.autoencoder." + key[len(_FIRST_STAGE) :]] = value
        elif key == "scale_factor":
            out["first_stage.scale_factor"] = value
        else:
            out[key] = value
    if "scale_factor" not in state_dict:  # CompVis without scale_by_std: the factor is in its config, not here
        stage.store_scale(out, "first_stage.")
    if use_ema:
        trainable = [name for name, p in denoiser.named_parameters() if p.requires_grad]
        missing = [_shadow_name(n) for n in trainable if _shadow_name(n) not in state_dict]
        if missing:
            raise ValueError(
                f"use_ema=True but the state dict has no EMA shadow for {len(missing)} denoiser parameter(s), e.g. "
                f"{missing[:3]}; load without use_ema, or check that it is a CompVis checkpoint with use_ema"
            )
        out.update({prefix + name: state_dict[_shadow_name(name)] for name in trainable})
    return out


def to_compvis_state_dict(module: Any, *, use_ema: bool = False, scale_by_std: bool | None = None) -> dict[str, Tensor]:
    """``module``'s weights as the state dict of CompVis' ``LatentDiffusion`` (loads there with ``strict=True``).

    The denoiser goes to ``model.diffusion_model.*``, the autoencoder to ``first_stage_model.*`` (kept even when the
    first stage leaves it out of this module's checkpoints), the condition encoder stays ``cond_stage_model.*``, and
    the twelve schedule buffers are written in float32 on the CPU from the registered schedule. Other entries of
    ``module.state_dict()`` are passed through (CompVis' class has no place for them).

    Args:
        module: A ``CompVisCompat`` + ``LatentDiffusionMixin`` module with a first stage and a denoiser.
        use_ema: Write ``LitEma``'s keys (for a CompVis model built with ``use_ema=True``, its default): the
            shadows are the averaged weights of the attached Trainer's ``EMAWeightAveraging`` once it has averaged,
            else the current weights. ``model_ema.decay`` is LitEma's default 0.9999 and ``model_ema.num_updates`` is
            -1 (LitEma's "no warm-up" value): Lightning's callback records neither a decay nor a LitEma count.
        scale_by_std: The CompVis model's ``scale_by_std``: only then is ``scale_factor`` a buffer (a key of its
            state dict). ``None`` takes the first stage's ``scale_by_std``.

    Returns:
        The CompVis state dict (new tensors for the tables and EMA entries, the module's own otherwise).

    Raises:
        TypeError: ``module`` is not a ``CompVisCompat`` module; a flag is not a bool.
        ValueError: ``module`` lacks a first stage or denoiser.
    """
    use_ema = check_bool("use_ema", use_ema)
    denoiser, prefix, stage = _parts(module)
    scale_by_std = stage.scale_by_std if scale_by_std is None else check_bool("scale_by_std", scale_by_std)
    schedule = module._require_schedule()
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if key.startswith(prefix):
            out[_DENOISER + key[len(prefix) :]] = value
        elif not key.startswith("first_stage."):
            out[key] = value
    out.update({_FIRST_STAGE + k: v for k, v in stage.autoencoder.state_dict().items()})
    if scale_by_std:
        out["scale_factor"] = torch.tensor(stage.scale, dtype=torch.float32)
    out.update({name: schedule.table(name).to(torch.float32).clone() for name in COMPVIS_TABLES})
    if use_ema:
        out.update(_ema_entries(module, denoiser))
    return out


def _ema_entries(module: Any, denoiser: nn.Module) -> dict[str, Tensor]:
    """LitEma's state: decay, num_updates and the shadows (averaged weights when a Trainer has averaged them)."""
    trainer = getattr(module, "_trainer", None)
    averaged = first_averaged_module(trainer)[0] if trainer is not None else None
    source = denoiser
    if averaged is not None:
        source = getattr(averaged, module.denoiser_name)
        source = source.diffusion_model if isinstance(source, DiffusionModelHolder) else source
    averaged_values = dict(source.named_parameters())
    entries: dict[str, Tensor] = {
        _EMA + "decay": torch.tensor(_LITEMA_DECAY, dtype=torch.float32),
        _EMA + "num_updates": torch.tensor(-1, dtype=torch.int),
    }
    for name, parameter in denoiser.named_parameters():
        if parameter.requires_grad:
            entries[_shadow_name(name)] = averaged_values[name].detach().clone()
    return entries
