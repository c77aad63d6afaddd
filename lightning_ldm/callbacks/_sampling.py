"""What sampling callbacks share: the averaged weights, eval mode, and training's random streams left untouched.

:class:`~lightning_ldm.callbacks.SampleLogger` and :class:`~lightning_ldm.callbacks.SampleQualityMonitor` sample
inside :func:`sampling_weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_ldm._checks import check_choice, check_int, check_mapping, check_real, check_sampler
from lightning_ldm.ddim import DDIM_METHODS

__all__ = [
    "SAMPLE_DEFAULTS",
    "averaged_module",
    "callbacks_of",
    "check_sample_kwargs",
    "first_averaged_module",
    "floating_dtype",
    "sample_options",
    "sampling_weights",
    "training_streams_kept",
]

#: The options of :meth:`DiffusionMixin.sample` a sampling callback passes on (``sample_kwargs``), with defaults.
SAMPLE_DEFAULTS: Mapping[str, Any] = {
    "sampler": "ddim",
    "num_steps": 50,
    "method": "uniform",
    "eta": 0.0,
    "guidance_scale": 1.0,
    "clip_x0": None,
}

#: Which weights a sampling callback used: the averaged copy, the training weights (no averaging callback), or the
#: training weights because the averaging callback has not averaged anything yet.
Weights = Literal["averaged", "training", "pending"]


def averaged_module(callback: WeightAveraging) -> nn.Module | None:
    """The module holding ``callback``'s averaged weights, or ``None`` before it exists (outside ``fit``).

    Lightning 2.6 keeps the ``AveragedModel`` in the private attribute ``_average_model`` and offers no public
    accessor; this function is the one place that reads it.
    """
    average = getattr(callback, "_average_model", None)
    return average.module if isinstance(average, AveragedModel) else None


def callbacks_of(trainer: pl.Trainer) -> list[Callback]:
    """``trainer.callbacks`` (set by Lightning's callback connector, so invisible to type checkers)."""
    return list(getattr(trainer, "callbacks", []))


def first_averaged_module(trainer: pl.Trainer) -> tuple[nn.Module | None, bool]:
    """The first ``WeightAveraging`` callback's averaged module once it holds an average, and whether one is pending.

    Before the callback's first update (e.g. ``EMAWeightAveraging(update_starting_at_step=N)`` before step N) its
    module is an untrained copy of the initial weights: ``(None, True)``, so the training weights are sampled.
    """
    pending = False
    for callback in callbacks_of(trainer):
        if not isinstance(callback, WeightAveraging) or (module := averaged_module(callback)) is None:
            continue
        count = getattr(getattr(callback, "_average_model", None), "n_averaged", None)
        if count is None or int(count) > 0:
            return module, False
        pending = True
    return None, pending


@contextlib.contextmanager
def _swapped_weights(module: nn.Module, averaged: nn.Module) -> Iterator[None]:
    """Swap ``module``'s parameter and buffer values with ``averaged``'s, and back on exit (bitwise round trip).

    The tensors are paired in the order Lightning's ``WeightAveraging`` pairs them: parameters, then buffers.
    """
    pairs = list(
        zip(
            [*module.parameters(), *module.buffers()],
            [*averaged.parameters(), *averaged.buffers()],
            strict=True,
        )
    )

    def swap() -> None:
        with torch.no_grad():
            for current, average in pairs:
                kept = average.detach().clone()
                average.copy_(current.detach())
                current.copy_(kept)

    swap()
    try:
        yield
    finally:
        swap()


@contextlib.contextmanager
def training_streams_kept(pl_module: nn.Module) -> Iterator[None]:
    """Restore the global CPU RNG, the module device's CUDA RNG and ``pl_module.diffusion_generator`` on exit."""
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    generator = getattr(pl_module, "diffusion_generator", None)
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        try:
            yield
        finally:
            if state is not None and generator is not None:
                generator.set_state(state)

def floating_dtype(pl_module: pl.LightningModule) -> torch.dtype:
    """The module's dtype (what true-half precision casts it to), float32 unless it is a floating dtype."""
    dtype = pl_module.dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32



@contextlib.contextmanager
def sampling_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[Weights]:
    """Run the body with ``pl_module`` in eval mode and the averaged weights in place; yield which weights.

    The weights are those of the first ``WeightAveraging`` callback once it has averaged (``"averaged"``); before its
    first update (``"pending"``) and without one (``"training"``) the training weights are used. On exit the
    training weights are back bitwise, every submodule's train/eval mode is restored, and so are the global CPU RNG,
    the module device's CUDA RNG and ``pl_module.diffusion_generator``.
    """
    averaged, pending = first_averaged_module(trainer)
    weights: Weights = "averaged" if averaged is not None else "pending" if pending else "training"
    modes = [(m, m.training) for m in pl_module.modules()]
    pl_module.eval()
    try:
        with training_streams_kept(pl_module), contextlib.ExitStack() as stack:
            if averaged is not None:
                stack.enter_context(_swapped_weights(pl_module, averaged))
            yield weights
    finally:
        for module, mode in modes:
            module.training = mode


def check_sample_kwargs(sample_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``sample_kwargs`` validated and completed with :data:`SAMPLE_DEFAULTS` (the callbacks' sampling options).

    Raises:
        TypeError: ``sample_kwargs`` is not a mapping, a value has the wrong type, or ``sampler`` is neither
            ``"ddim"`` nor a diffusers-style scheduler.
        ValueError: A key is not an option of ``sample`` that a callback passes on, or a value is out of range.
    """
    if sample_kwargs is None:
        sample_kwargs = {}
    check_mapping("sample_kwargs", sample_kwargs, "a mapping of sample() options")
    unknown = sorted(set(sample_kwargs) - set(SAMPLE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"sample_kwargs has unknown key(s) {unknown}; expected some of {list(SAMPLE_DEFAULTS)} (the noise, the "
            "generator and the conditions are the callback's own)"
        )
    options = {**SAMPLE_DEFAULTS, **sample_kwargs}
    check_sampler(options["sampler"])
    options["num_steps"] = check_int("sample_kwargs['num_steps']", options["num_steps"], minimum=1)
    check_choice("sample_kwargs['method']", options["method"], DDIM_METHODS)
    options["eta"] = check_real("sample_kwargs['eta']", options["eta"], minimum=0.0)
    options["guidance_scale"] = check_real("sample_kwargs['guidance_scale']", options["guidance_scale"])
    if options["clip_x0"] is not None:
        clip = check_real("sample_kwargs['clip_x0']", options["clip_x0"], minimum=0.0, min_inclusive=False)
        options["clip_x0"] = clip
    return options


def sample_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``sample`` for validated ``options``: the DDIM-only ones left out for a scheduler."""
    out = dict(options)
    if not (isinstance(out["sampler"], str) and out["sampler"] == "ddim"):
        del out["method"], out["clip_x0"]
    return out
