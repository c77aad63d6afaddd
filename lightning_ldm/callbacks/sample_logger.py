r"""``SampleLogger``: DDIM samples from fixed starting noise, written to the Trainer's loggers during training.

Every ``every_n_steps`` optimizer steps and/or at the end of every validation pass, global rank zero samples the
module with DDIM from the same starting noise, decodes through the first stage when the module has one, and writes
an image grid (or, for 5-D samples, an animated grid) to every attached logger (see
:mod:`lightning_ldm.callbacks.sample_writers`).

What it leaves alone: the training weights (restored bitwise after sampling with averaged weights), the modules'
train/eval modes, and every random stream of training: the global CPU RNG, the module device's CUDA RNG and the
module's ``diffusion_generator``. A fit with and without the callback ends with the same weights.

A configuration that could never log (a conditional model and no ``cond``, more steps than the schedule or the
scheduler takes, samples that are no pictures and no first stage to decode them) is refused at fit start, not after
``every_n_steps`` steps of training. Samples holding NaN are written (as black pixels) with a warning and their NaN
count logged as ``"{tag}/nan_count"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ldm._checks import (
    check_int,
    check_real,
    check_scheduler,
    check_shape,
    check_str,
    check_value_range,
    describe,
)
from lightning_ldm.callbacks._base import PeriodicCallback
from lightning_ldm.callbacks._diffusion import diffusion_module
from lightning_ldm.callbacks._sampling import (
    check_sample_kwargs,
    floating_dtype,
    sample_options,
    sampling_weights,
)
from lightning_ldm.callbacks.sample_writers import needs_pillow, write_image, write_video
from lightning_ldm.guidance import guided_condition
from lightning_ldm.instantiation import get_obj_from_str
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.media import image_grid, to_uint8, video_grid
from lightning_ldm.seeding import derive_seed

__all__ = ["SampleLogger"]

log = logging.getLogger(__name__)

Conditioning = Tensor | Mapping[str, Any] | list[Any] | tuple[Any, ...] | None
_PICTURE_CHANNELS = (1, 3)


#: String conditions: taken from a key of the first batch of the fit, or made by a function named by its dotted path.
BATCH_PREFIX, CALL_PREFIX = "batch:", "call:"


def _is_numbers(value: Any) -> bool:
    """``value`` is a number, or a non-empty (nested) list/tuple of numbers only (what YAML gives for a tensor)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tensors(name: str, value: Any) -> Any:
    """``value`` with every list of numbers in it (at the top or as a mapping value) made a tensor.

    Integers give an int64 tensor (class labels), any float a float32 one; lists holding tensors are left alone.
    """
    if isinstance(value, Mapping):
        return {k: _as_tensors(f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and _is_numbers(value):
        try:
            return torch.tensor(value, dtype=None if _all_ints(value) else torch.float32)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{name}={describe(value)} is a ragged list of numbers; expected a rectangular one"
            ) from err
    return value


def _all_ints(value: Any) -> bool:
    return all(_all_ints(v) for v in value) if isinstance(value, (list, tuple)) else isinstance(value, int)


def _is_string_form(value: Any) -> bool:
    return isinstance(value, str) and any(
        value.startswith(p) and len(value) > len(p) for p in (BATCH_PREFIX, CALL_PREFIX)
    )


def _check_cond(name: str, value: Any) -> Conditioning | str:
    if _is_string_form(value):
        return value
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, str) and not _is_string_form(item):
                raise TypeError(
                    f"{name}[{key!r}] is the string {item!r}; a string condition is "
                    f"'{BATCH_PREFIX}<key>' or '{CALL_PREFIX}<package.module.function>'"
                )
    if value is not None and not isinstance(value, (Tensor, Mapping, list, tuple)):
        raise TypeError(
            f"{name} must be a Tensor, a list of Tensors, a mapping (keyword arguments, or CompVis' dict of lists), a "
            f"(nested) list of numbers, '{BATCH_PREFIX}<key>', '{CALL_PREFIX}<package.module.function>' or None, got "
            f"{type(value).__name__} {describe(value)}"
        )
    return _as_tensors(name, value)


def _never_called(*args: Any, **kwargs: Any) -> Tensor:  # pragma: no cover - only its guidance is built
    raise RuntimeError("the conditions' check never runs the model")


def _pending(value: Any, prefix: str) -> str | None:
    """The first string condition starting with ``prefix`` in ``value`` (itself or a mapping value), else ``None``."""
    values = value.values() if isinstance(value, Mapping) else (value,)
    return next((v for v in values if isinstance(v, str) and v.startswith(prefix)), None)


def _replaced(value: Any, prefix: str, resolve: Any) -> Any:
    """``value`` with the string conditions starting with ``prefix`` (itself or mapping values) resolved."""
    if isinstance(value, Mapping):
        return {k: _replaced(v, prefix, resolve) for k, v in value.items()}
    return resolve(value) if isinstance(value, str) and value.startswith(prefix) else value


def _from_batch(name: str, spec: str, batch: Any, rows: int) -> Any:
    """The first ``rows`` rows of ``batch[key]`` for ``spec = "batch:<key>"`` (an index for a tuple/list batch).

    Raises:
        ValueError: The batch has no such key, or the value has fewer than ``rows`` rows.
    """
    key = spec[len(BATCH_PREFIX) :]
    if isinstance(batch, Mapping) and key in batch:
        value = batch[key]
    elif isinstance(batch, (list, tuple)) and key.isdigit() and int(key) < len(batch):
        value = batch[int(key)]
    else:
        keys = (
            list(batch)
            if isinstance(batch, Mapping)
            else f"indices 0..{len(batch) - 1}"
            if isinstance(batch, (list, tuple))
            else f"none (a {type(batch).__name__})"
        )
        raise ValueError(f"SampleLogger({name}={spec!r}): the first batch has no key {key!r}; its keys: {keys}")
    if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] < rows:
        raise ValueError(
            f"SampleLogger({name}={spec!r}) needs a tensor with at least {rows} rows (the samples' batch) under "
            f"{key!r} of the first batch, got {describe(value)}"
        )
    return value[:rows].detach().clone()


def _to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``value`` with every tensor in it (through lists and dicts) moved to ``device``, floating ones cast to ``dtype``.

    Integer tensors (class labels, token ids) keep their dtype.
    """
    if isinstance(value, Tensor):
        return value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_device(v, device, dtype) for v in value]
    return value


def _check_can_log(logger: SampleLogger, pl_module: pl.LightningModule) -> None:
    """Raise when ``logger`` could never log samples of ``pl_module`` (called at fit start).

    Raises:
        ValueError: A conditional ``LatentDiffusionMixin`` and no ``cond``; ``num_steps`` more than the schedule (or
            the scheduler) takes; or, with the default ``sample``/``write`` and no first stage, a ``shape`` that is no
            picture (4-D or 5-D with 1 or 3 channels).
    """
    module = type(pl_module).__name__
    key = getattr(pl_module, "conditioning_key", None)
    if isinstance(pl_module, LatentDiffusionMixin) and key is not None and logger.cond is None:
        raise ValueError(
            f"{module} is conditional (conditioning_key={key!r}) but the SampleLogger has no condition to sample it "
            "with; pass SampleLogger(cond=..., uncond=...) (uncond is needed for guidance_scale != 1)"
        )
    schedule = getattr(pl_module, "noise_schedule", None)
    sampler, num_steps = logger.sample_kwargs["sampler"], logger.sample_kwargs["num_steps"]
    if schedule is not None and not (isinstance(sampler, str) and sampler == "ddim"):
        check_scheduler(sampler, schedule, num_steps)
    elif schedule is not None and num_steps > schedule.num_timesteps:
        steps = schedule.num_timesteps
        raise ValueError(
            f"SampleLogger(sample_kwargs={{'num_steps': {num_steps}}}) is more than the {steps} timesteps of "
            f"{module}'s schedule; expected an integer in [1, {steps}]"
        )
    default = type(logger).sample is SampleLogger.sample and type(logger).write is SampleLogger.write
    if not default or getattr(pl_module, "first_stage", None) is not None:
        return
    shape = logger.shape
    channels = shape[1 if len(shape) == 4 or logger.frame_dim == 2 else 2] if len(shape) in (4, 5) else None
    if channels not in _PICTURE_CHANNELS:
        raise ValueError(
            f"SampleLogger(shape={shape}, frame_dim={logger.frame_dim}) gives samples that are no pictures and "
            f"{module} has no first stage to decode them: write() takes images (B, C, H, W) or clips (5-D, see "
            f"frame_dim) with C in {_PICTURE_CHANNELS}; override SampleLogger.sample to map them to pictures"
        )


class SampleLogger(PeriodicCallback):
    r"""Log DDIM samples from fixed starting noise every N optimizer steps and/or at validation end.

    Example::

        trainer = L.Trainer(callbacks=[EMAWeightAveraging(), SampleLogger((16, 3, 32, 32), every_n_steps=500)],
                            logger=TensorBoardLogger("runs"))

    The starting noise is drawn once, in float32, from a CPU generator seeded with ``seed`` (:attr:`noise`), and
    moved to the module's device and dtype at each logging; the η noise (``eta > 0``) comes from a generator on the
    module's device reseeded with ``derive_seed(seed, 1)`` before each sampling, so every logging is comparable.

    With a ``WeightAveraging`` callback (e.g. ``EMAWeightAveraging``) on the Trainer, samples come from the averaged
    weights once it has averaged (during ``fit``); the training weights are put back bitwise afterwards. Before its
    first update (``update_starting_at_step``) the training weights are sampled and logged as
    ``f"{tag}/training_weights"`` (:attr:`last_weights` says which). List the ``SampleLogger`` after the averaging
    callback so that step-based samples include that step's update.

    Samples are logged by global rank zero only, with no collective call: do not use it with a strategy that
    shards the weights (FSDP, DeepSpeed stage 3). Customise by overriding :meth:`sample` (how samples are made)
    or :meth:`write` (where they go).

    Args:
        shape: Shape of the starting noise, batch first, e.g. ``(16, 4, 32, 32)`` for latents.
        every_n_steps: Log after every this many optimizer steps (``None``: not on a step schedule).
        at_validation_end: Log at the end of every validation pass (not the sanity check).
        cond: The condition passed to ``sample``: any form the module's ``apply_model`` takes (moved to the module's
            device, floating tensors to its dtype), or a form a YAML config can write (see "Conditions from a
            config" below).
        uncond: The unconditional condition for guidance, in the same forms.
        sample_kwargs: Options of :meth:`~lightning_ldm.mixin.DiffusionMixin.sample`: ``sampler`` (``"ddim"``, the
            default, or a diffusers-style scheduler, compared with the module's schedule and ``num_steps`` at fit
            start), ``num_steps`` (50), ``method`` (``"uniform"``), ``eta`` (0), ``guidance_scale`` (1; ≠ 1 needs
            ``cond`` and ``uncond``), ``clip_x0`` (``None``).
        seed: Seed of the starting noise and the η noise.
        value_range: ``(low, high)`` of the decoded samples, shown as black and white.
        tag: Name of the logged picture.
        nrow: Samples per row of the grid (``ceil(√B)`` when ``None``).
        frame_dim: For 5-D samples, the axis of the frames: 2 for ``(B, C, T, H, W)``, 1 for ``(B, T, C, H, W)``.
        max_frames: Log at most this many leading frames of a clip (``None``: all).
        fps: Frames per second of the animations.
        allowed_prefixes: The modules a ``"call:..."`` condition may name (see
            :func:`~lightning_ldm.instantiation.get_obj_from_str`); ``None``: the top-level package of the
            LightningModule's class and ``lightning_ldm``.

    Conditions from a config (LightningCLI), besides tensors:

    * a list of integers: class labels, an int64 tensor (``cond: [0, 1, 2, 3]``); a nested list of numbers: a
      float32 tensor (``[[0.5, 1.0], ...]``); a mapping of those: keyword conditions (``{"y": [0, 1, 2, 3]}``);
    * ``"batch:<key>"``: the first ``shape[0]`` rows of ``batch[key]`` of the first batch of each fit (the sanity
      check's first validation batch when there is one, else the first training batch); for a tuple batch the key
      is an index (``"batch:1"`` for the labels of ``(images, labels)``);
    * ``"call:<package.module.function>"``: ``function(shape[0])``'s return value, called once at ``setup``; the
      path is resolved through the allow-list ``allowed_prefixes``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range (e.g. ``every_n_steps < 1``), nothing would ever be logged, or
            guidance is asked for without ``cond`` and ``uncond``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        every_n_steps: int | None = None,
        at_validation_end: bool = True,
        *,
        cond: Conditioning | str = None,
        uncond: Conditioning | str = None,
        sample_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        value_range: Sequence[float] = (-1.0, 1.0),
        tag: str = "samples",
        nrow: int | None = None,
        frame_dim: int = 2,
        max_frames: int | None = None,
        fps: float = 8.0,
        allowed_prefixes: Sequence[str] | None = None,
    ) -> None:
        self.shape = check_shape("shape", shape, min_ndim=2)
        super().__init__(every_n_steps, at_validation_end)
        self.sample_kwargs = check_sample_kwargs(sample_kwargs)
        self.cond, self.uncond = _check_cond("cond", cond), _check_cond("uncond", uncond)
        scale = self.sample_kwargs["guidance_scale"]
        if scale != 1.0 and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={scale:g} needs both cond and uncond; got only one or none")
        self.seed = check_int("seed", seed, minimum=0)
        self.value_range = check_value_range(value_range)
        self.tag = check_str("tag", tag, nonempty=True)
        self.nrow = None if nrow is None else check_int("nrow", nrow, minimum=1)
        self.frame_dim = check_int("frame_dim", frame_dim, minimum=1, maximum=2)
        self.max_frames = None if max_frames is None else check_int("max_frames", max_frames, minimum=1)
        self.fps = check_real("fps", fps, minimum=0.0, min_inclusive=False)
        if allowed_prefixes is not None and (
            isinstance(allowed_prefixes, str) or not all(isinstance(p, str) for p in allowed_prefixes)
        ):
            raise TypeError(f"allowed_prefixes must be a list of module prefixes or None, got {allowed_prefixes!r}")
        self.allowed_prefixes = None if allowed_prefixes is None else list(allowed_prefixes)
        #: The conditions in use: ``cond``/``uncond`` with the ``"batch:"`` and ``"call:"`` forms resolved.
        self._conditions: dict[str, Any] = {"cond": self.cond, "uncond": self.uncond}
        self._check_conditions()
        self._noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float32)
        self._last_step: int | None = None
        self._warned_nan = False
        #: The samples of the last logging (float32, CPU, as :meth:`sample` returned them), ``None`` before.
        self.last_samples: Tensor | None = None
        #: The weights of the last logging: ``"averaged"`` or ``"training"`` (``None`` before the first).
        self.last_weights: str | None = None
        #: The tag of the last logging: ``tag``, or ``f"{tag}/training_weights"`` before an average exists.
        self.last_tag: str | None = None

    @property
    def noise(self) -> Tensor:
        """The fixed starting noise (float32, CPU; a copy)."""
        return self._noise.clone()

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module and the order of callbacks; at the start of a fit, reset, check Pillow, take conditions.

        Raises:
            TypeError: The module does not mix in ``DiffusionMixin``.
            ModuleNotFoundError: Files will be written and Pillow is missing (the message names the extra).
        """
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            needs_pillow(trainer, clips=len(self.shape) == 5, who="SampleLogger")
            self._conditions = {"cond": self.cond, "uncond": self.uncond}  # "batch:" from this fit's first batch
        self._resolve_calls(pl_module)
        self._check_conditions()

    @override
    def reset(self) -> None:
        """A fit starts afresh: its steps are logged even when a previous fit of this callback logged the same ones."""
        self._last_step, self._warned_nan = None, False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a configuration that could never log (see the module docstring), before any training step.

        Raises:
            ValueError: The configuration cannot log; the message says what to pass.
        """
        _check_can_log(self, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Take the ``"batch:<key>"`` conditions from the first batch of the fit."""
        self._take_batch(batch)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Take the ``"batch:<key>"`` conditions from the first batch of the fit (the sanity check's counts)."""
        if trainer.state.fn == "fit":
            self._take_batch(batch)

    def _take_batch(self, batch: Any) -> None:
        taken = False
        for name, value in self._conditions.items():
            if _pending(value, BATCH_PREFIX):
                self._conditions[name] = _replaced(
                    value, BATCH_PREFIX, lambda spec, name=name: _from_batch(name, spec, batch, self.shape[0])
                )
                taken = True
        if taken:
            self._check_conditions()

    def _check_conditions(self) -> None:
        """Refuse now what the first logging would: a condition of another batch size, a pair that cannot batch.

        Runs once the conditions are known: at construction, after ``"call:"`` at setup, after ``"batch:"``.

        Raises:
            ValueError: A tensor whose batch is neither ``shape[0]`` nor 1, or ``cond``/``uncond`` naming other keys.
            TypeError: Under guidance, entries that cannot be batched together (not tensors of the same structure).
        """
        cond, uncond = self._conditions["cond"], self._conditions["uncond"]
        if any(_pending(value, prefix) for value in (cond, uncond) for prefix in (BATCH_PREFIX, CALL_PREFIX)):
            return
        meta = torch.device("meta")  # shapes only: no copies, and tensors on different devices batch as sampling would
        scale = self.sample_kwargs["guidance_scale"]
        guided_condition(_never_called, self.shape[0], scale, _to_device(cond, meta), _to_device(uncond, meta))

    def _resolve_calls(self, pl_module: pl.LightningModule) -> None:
        """Call the ``"call:<path>"`` conditions' functions (once per setup) with the number of samples."""
        prefixes = self.allowed_prefixes
        if prefixes is None:
            prefixes = [type(pl_module).__module__.partition(".")[0], "lightning_ldm"]

        def call(spec: str) -> Any:
            function = get_obj_from_str(spec[len(CALL_PREFIX) :], allowed_prefixes=prefixes)
            if not callable(function):
                raise TypeError(f"SampleLogger's condition {spec!r} names a {type(function).__name__}, not a function")
            made = function(self.shape[0])
            if isinstance(made, str):
                raise TypeError(f"SampleLogger's condition {spec!r} returned the string {made!r}; expected a condition")
            return _check_cond(f"the condition {spec!r} returned", made)

        for name, value in self._conditions.items():
            if _pending(value, CALL_PREFIX):
                self._conditions[name] = _replaced(value, CALL_PREFIX, call)

    def _condition(self, name: str) -> Any:
        value = self._conditions[name]
        spec = _pending(value, BATCH_PREFIX) or _pending(value, CALL_PREFIX)
        if spec:
            when = "the first batch of the fit" if spec.startswith(BATCH_PREFIX) else "setup"
            raise RuntimeError(
                f"SampleLogger({name}: {spec!r}) is resolved at {when}, which has not come yet; sample inside a fit"
            )
        return value

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """:meth:`log_samples` (on the step schedule and at validation end)."""
        return self.log_samples(trainer, pl_module)

    # --------------------------------------------------------------------------------------------- logging
    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Sample (with the averaged weights if any) and write, on global rank zero, at most once per global step.

        Args:
            trainer: The Trainer (its ``global_step`` names the logging, its loggers receive it).
            pl_module: The module to sample.

        Returns:
            The samples (as :attr:`last_samples`), or ``None`` on other ranks or when this step is logged already.
        """
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return None
        self._last_step = step
        with sampling_weights(trainer, pl_module) as weights:
            self.last_weights = "averaged" if weights == "averaged" else "training"
            self.last_tag = f"{self.tag}/training_weights" if weights == "pending" else self.tag
            if weights == "pending":
                log.info("SampleLogger: no weights averaged yet at step %d; sampling the training weights", step)
            noise = self._noise.to(device=pl_module.device, dtype=floating_dtype(pl_module))
            generator = torch.Generator(device=pl_module.device).manual_seed(derive_seed(self.seed, 1))
            samples = self.sample(trainer, pl_module, noise, generator).detach().float().cpu()
        self.last_samples = samples
        self._report_nan(trainer, samples, step)
        self.write(trainer, samples, step)
        return samples

    def _report_nan(self, trainer: pl.Trainer, samples: Tensor, step: int) -> None:
        """Warn (once per fit) and log ``"{tag}/nan_count"`` when ``samples`` hold NaN."""
        count = int(torch.isnan(samples).sum())
        if not count:
            return
        tag = self.last_tag or self.tag
        if not self._warned_nan:
            self._warned_nan = True
            rank_zero_warn(
                f"SampleLogger: {count} of {samples.numel()} sample values are NaN at step {step} (written as black "
                f"pixels; the count is logged as '{tag}/nan_count')"
            )
        for logger in trainer.loggers:
            logger.log_metrics({f"{tag}/nan_count": float(count)}, step=step)

    def sample(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, noise: Tensor, generator: torch.Generator
    ) -> Tensor:
        """Make the samples: DDIM from ``noise``, then the first stage's decoder when the module has one.

        The denoiser is ``pl_module.apply_model`` (``forward(x_t, t, **kw)`` for a ``DiffusionMixin``; CompVis'
        routing by conditioning key for a ``LatentDiffusionMixin``, whose :meth:`sample` also decodes). With a
        ``scheduler`` (any diffusers-style scheduler) its loop runs instead of our DDIM. Runs with the module in eval
        mode and the weights to show already in place.

        Args:
            trainer: The Trainer.
            pl_module: The module (a ``DiffusionMixin``).
            noise: Starting noise on the module's device.
            generator: Generator for the η noise, on the module's device.

        Returns:
            Samples ``(B, C, H, W)`` or ``(B, C, T, H, W)`` / ``(B, T, C, H, W)`` (see ``frame_dim``).
        """
        options = {**sample_options(self.sample_kwargs), "generator": generator, "x_T": noise}
        cond = _to_device(self._condition("cond"), noise.device, noise.dtype)  # the module's dtype under "bf16-true"
        uncond = _to_device(self._condition("uncond"), noise.device, noise.dtype)
        samples = diffusion_module(pl_module, type(self).__name__).sample(
            noise.shape, cond=cond, uncond=uncond, **options
        )
        return samples[0] if isinstance(samples, tuple) else samples

    def write(self, trainer: pl.Trainer, samples: Tensor, step: int) -> list[str]:
        """Write ``samples`` as a grid (4-D) or an animated grid (5-D) to the Trainer's loggers.

        Returns:
            Where they went (logger class names and file paths).

        Raises:
            ValueError: ``samples`` is neither 4-D nor 5-D, or its channel count is not 1 or 3 (override
                :meth:`sample` to map other channels to pictures).
        """
        pictures = to_uint8(samples, self.value_range)
        tag = self.last_tag or self.tag
        if samples.ndim == 4:
            return write_image(trainer, tag, image_grid(pictures, nrow=self.nrow), step)
        if samples.ndim == 5:
            clips = pictures.movedim(2, 1) if self.frame_dim == 2 else pictures
            clips = clips[:, : self.max_frames]
            return write_video(trainer, tag, video_grid(clips, nrow=self.nrow), step, self.fps)
        raise ValueError(
            f"samples must be images (B, C, H, W) or clips (5-D), got shape {tuple(samples.shape)}; override "
            "SampleLogger.sample to return one of them"
        )
