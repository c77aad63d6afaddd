r"""``CompVisCompat``: CompVis' ``DDPM``/``LatentDiffusion`` names on a :class:`~lightning_ldm.mixin.DiffusionMixin`.

Opt in when code written against CompVis reads them (its ``DDIMSampler`` and ``PLMSSampler`` read
``alphas_cumprod``, ``betas``, ``num_timesteps``, ``parameterization``; scripts call ``q_sample`` or
``predict_start_from_noise``; state dicts carry the schedule tables)::

    class LDM(CompVisCompat, LatentDiffusionMixin, L.LightningModule): ...

Everything here reads the module's :attr:`~lightning_ldm.mixin.DiffusionMixin.noise_schedule`: the tables are
read-only attributes that give the schedule's table on the module's device (in the schedule's ``table_dtype``), never
buffers, so precision flags and EMA cannot reach them; the identities are the schedule's. CompVis state dicts that
carry the tables load after each table is compared with ours at the precision it was stored in.

On a :class:`~lightning_ldm.latent.LatentDiffusionMixin` module it also gives what CompVis' scripts read from a
``LatentDiffusion``: ``first_stage_model``, ``scale_factor``, ``encode_first_stage`` (the posterior, as CompVis),
``get_first_stage_encoding``, ``decode_first_stage`` (CompVis' arithmetic), ``cond_stage_model`` and
``get_learned_conditioning`` once :meth:`CompVisCompat.register_cond_stage` registered a condition encoder,
``model.diffusion_model`` where the denoiser is held by :class:`DiffusionModelHolder`, and ``ema_scope()`` (the
weights of the Trainer's ``EMAWeightAveraging``). Whole CompVis checkpoints convert with
:mod:`lightning_ldm.compvis_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_ldm._checks import check_bool
from lightning_ldm.callbacks._sampling import _swapped_weights, first_averaged_module
from lightning_ldm.first_stage import FirstStage, _draw_latents, _first_output
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import SCHEDULE_TABLES

if TYPE_CHECKING:
    import lightning.pytorch as L

    class _Base(DiffusionMixin, L.LightningModule): ...

else:
    _Base = object

__all__ = ["CompVisCompat", "DiffusionModelHolder"]

log = logging.getLogger(__name__)


class DiffusionModelHolder(nn.Module):
    """Holds the denoiser as ``diffusion_model``, so that ``module.model.diffusion_model`` is CompVis' path to it.

    ``self.model = DiffusionModelHolder(unet)`` gives the denoiser's parameters CompVis' state-dict keys
    (``model.diffusion_model.*``). Unlike CompVis' ``DiffusionWrapper`` it does not route conditions: ``apply_model``
    routes them and calls the holder, which passes every argument on to ``diffusion_model`` unchanged.
    """

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        if not isinstance(diffusion_model, nn.Module):
            raise TypeError(f"diffusion_model must be an nn.Module, got {type(diffusion_model).__name__}")
        self.diffusion_model = diffusion_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``diffusion_model(*args, **kwargs)``."""
        return self.diffusion_model(*args, **kwargs)


class _ScheduleTable:
    """Read-only attribute ``module.<name>``: the schedule table ``name`` on the module's device."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _ScheduleTable: ...
    @overload
    def __get__(self, obj: CompVisCompat, objtype: type | None = None) -> Tensor: ...
    def __get__(self, obj: CompVisCompat | None, objtype: type | None = None) -> Tensor | _ScheduleTable:
        if obj is None:
            return self
        return obj._require_schedule().table(self.name, obj._schedule_device)

    def __set__(self, obj: CompVisCompat, value: Any) -> None:
        raise AttributeError(f"{self.name} is a table of the noise schedule; call register_schedule(...) to change it")


class CompVisCompat(_Base):
    """CompVis' names on a diffusion module: mix in before the diffusion mixin (``class M(CompVisCompat, ...)``).

    Adds the schedule tables under CompVis' names (``betas``, ``alphas_cumprod``, ..., ``lvlb_weights``;
    ``snr_table`` for the SNR), ``num_timesteps``, ``parameterization``, and the identities ``q_sample``,
    ``predict_start_from_noise``, ``get_v``, ``predict_start_from_z_and_v``, ``predict_eps_from_z_and_v`` and
    ``q_posterior``.
    """

    betas = _ScheduleTable()
    alphas_cumprod = _ScheduleTable()
    alphas_cumprod_prev = _ScheduleTable()
    sqrt_alphas_cumprod = _ScheduleTable()
    sqrt_one_minus_alphas_cumprod = _ScheduleTable()
    log_one_minus_alphas_cumprod = _ScheduleTable()
    sqrt_recip_alphas_cumprod = _ScheduleTable()
    sqrt_recipm1_alphas_cumprod = _ScheduleTable()
    posterior_variance = _ScheduleTable()
    posterior_log_variance_clipped = _ScheduleTable()
    posterior_mean_coef1 = _ScheduleTable()
    posterior_mean_coef2 = _ScheduleTable()
    snr_table = _ScheduleTable()
    lvlb_weights = _ScheduleTable()

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps of the registered schedule."""
        return self._require_schedule().num_timesteps

    @property
    def parameterization(self) -> str:
        """What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``."""
        return self._require_schedule().parameterization

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Diffuse ``x_start`` to ``t`` (:meth:`NoiseSchedule.q_sample`); ``noise`` drawn if ``None``."""
        noise = self.draw_noise(x_start) if noise is None else noise
        return self._require_schedule().q_sample(x_start, t, noise)

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (:meth:`NoiseSchedule.predict_start_from_noise`)."""
        return self._require_schedule().predict_start_from_noise(x_t, t, noise)

    def get_v(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``√ā_t·ε − √(1−ā_t)·x`` (:meth:`NoiseSchedule.get_v`)."""
        return self._require_schedule().get_v(x, noise, t)

    def predict_start_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = √ā_t·x_t − √(1−ā_t)·v`` (:meth:`NoiseSchedule.predict_start_from_v`)."""
        return self._require_schedule().predict_start_from_v(x_t, t, v)

    def predict_eps_from_z_and_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``ε = √ā_t·v + √(1−ā_t)·x_t`` (:meth:`NoiseSchedule.predict_noise_from_v`)."""
        return self._require_schedule().predict_noise_from_v(x_t, t, v)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t−1} | x_t, x_0)`` (:meth:`NoiseSchedule.q_posterior`)."""
        return self._require_schedule().q_posterior(x_start, x_t, t)

    # ------------------------------------------------------------------ CompVis' LatentDiffusion surface
    def _compvis_first_stage(self) -> FirstStage:
        stage = getattr(self, "first_stage", None)
        if not isinstance(stage, FirstStage):
            raise AttributeError(
                f"{type(self).__name__} has no first stage: CompVis' first-stage names need a LatentDiffusionMixin "
                "module and self.register_first_stage(...)"
            )
        return stage

    @property
    def first_stage_model(self) -> nn.Module:
        """The registered autoencoder (CompVis' ``first_stage_model``), ``first_stage.autoencoder`` here."""
        return self._compvis_first_stage().autoencoder

    @property
    def scale_factor(self) -> float:
        """The first stage's latent scale in use (CompVis' ``scale_factor``), a Python float."""
        return self._compvis_first_stage().scale

    @torch.no_grad()
    def encode_first_stage(self, x: Tensor) -> Any:
        """CompVis' ``encode_first_stage``: the autoencoder's posterior of ``x`` (not sampled, not scaled).

        A diffusers output is unwrapped to its ``latent_dist``. Pass the result to :meth:`get_first_stage_encoding`.
        ``diffusion_loss`` does not call this: it encodes to scaled latents itself.
        """
        encode: Any = self.first_stage_model.encode
        return _first_output(encode(x), "latent_dist")

    def get_first_stage_encoding(self, encoder_posterior: Any) -> Tensor:
        """CompVis' ``get_first_stage_encoding``: ``scale_factor · z``, ``z`` a sample of the posterior (or the tensor).

        A Gaussian posterior (``mean``/``std``) is sampled as ``mean + std·ε`` with ``ε`` from the global RNG, as
        CompVis' ``DiagonalGaussianDistribution.sample``; another distribution by its ``sample()``. A first-stage
        shift (diffusers' ``shift_factor``, absent in CompVis) is subtracted before scaling.

        Raises:
            TypeError: ``encoder_posterior`` is neither a Tensor nor a distribution.
        """
        z = _draw_latents([encoder_posterior], None, True)
        return self._compvis_first_stage().scale_latents(z).to(z.dtype)

    def decode_first_stage(self, z: Tensor) -> Tensor:
        """CompVis' ``decode_first_stage``: ``first_stage_model.decode(1/scale_factor · z)`` without gradients.

        The arithmetic is CompVis' (a multiplication by ``1/scale_factor``, bitwise the same as CompVis), run through
        the first stage's micro-batching and autocast options.
        """
        stage = self._compvis_first_stage()
        z_in = z * (1.0 / stage.scale)
        return stage.decode(z_in + stage.shift if stage.shift else z_in, scaled=False)

    @property
    def cond_stage_model(self) -> nn.Module | None:
        """The condition encoder of :meth:`register_cond_stage` (CompVis' ``cond_stage_model``), else ``None``."""
        module = self._modules.get("cond_stage_model")
        return module if isinstance(module, nn.Module) else None

    def register_cond_stage(self, encoder: nn.Module, *, trainable: bool = False, forward: str | None = None) -> None:
        """Register CompVis' ``cond_stage_model``: the encoder that :meth:`get_learned_conditioning` calls.

        As CompVis' ``instantiate_cond_stage``: unless ``trainable``, the encoder is put in eval mode, kept there by
        this module's ``train()``, and its parameters are frozen (``trainable_parameters()`` leaves them out). For
        CompVis' ``"__is_first_stage__"``, pass ``self.first_stage_model``.

        Args:
            encoder: The condition encoder (CompVis' ``FrozenCLIPEmbedder``, a class embedder, ...).
            trainable: CompVis' ``cond_stage_trainable``.
            forward: CompVis' ``cond_stage_forward``: the name of the encoder method to call; ``None`` calls its
                ``encode`` when it has one, else the encoder itself.

        Raises:
            TypeError: ``encoder`` is not an ``nn.Module``, ``trainable`` is not a bool, or ``forward`` does not name
                a callable of the encoder.
        """
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        trainable = check_bool("trainable", trainable)
        if forward is not None and not (isinstance(forward, str) and callable(getattr(encoder, forward, None))):
            raise TypeError(
                f"forward must name a method of the {type(encoder).__name__} encoder, got {forward!r}; None calls "
                "its encode (or the encoder itself)"
            )
        if not trainable:
            encoder.eval()  # never chained: a CompVis-frozen module's eval() returns False
            encoder.requires_grad_(False)
        nn.Module.__setattr__(self, "cond_stage_model", encoder)
        self.cond_stage_trainable = trainable
        self.cond_stage_forward = forward

    @override
    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``; a frozen condition encoder (not ``cond_stage_trainable``) stays in eval mode."""
        out = super().train(mode)
        encoder = self.cond_stage_model
        if encoder is not None and not getattr(self, "cond_stage_trainable", False):
            encoder.eval()
        return out

    def get_learned_conditioning(self, c: Any) -> Any:
        """CompVis' ``get_learned_conditioning``: the condition ``c`` (prompts, labels, ...) through the encoder.

        Calls the encoder's ``cond_stage_forward`` method if one was named, else its ``encode`` (a returned
        distribution gives its ``mode()``), else the encoder itself.

        Raises:
            AttributeError: No condition encoder is registered.
        """
        encoder = self.cond_stage_model
        if encoder is None:
            raise AttributeError(
                f"{type(self).__name__} has no cond_stage_model: call self.register_cond_stage(encoder) first"
            )
        forward = getattr(self, "cond_stage_forward", None)
        if forward is not None:
            return getattr(encoder, forward)(c)
        encode: Any = getattr(encoder, "encode", None)
        if callable(encode):
            out = encode(c)
            return out.mode() if not isinstance(out, Tensor) and callable(getattr(out, "mode", None)) else out
        return encoder(c)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """CompVis' ``ema_scope``: run the body with the averaged weights of the Trainer's ``EMAWeightAveraging``.

        The weights (every parameter and buffer, as Lightning averages them) are swapped in on entry and the
        training weights are back bitwise on exit. Without an attached Trainer, without a ``WeightAveraging``
        callback, or before its first update, the body runs with the training weights (CompVis with
        ``use_ema=False``). ``context`` is logged at INFO level, as CompVis prints it.
        """
        trainer = getattr(self, "_trainer", None)
        averaged = first_averaged_module(trainer)[0] if trainer is not None else None
        if averaged is None:
            yield None
            return
        with _swapped_weights(self, averaged):
            if context is not None:
                log.info("%s: Switched to EMA weights", context)
            yield None
        if context is not None:
            log.info("%s: Restored training weights", context)

    @override
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Accept CompVis state dicts that carry the tables: compare each at its stored precision, then drop it.

        A differing table is a load error (even with ``strict=False``) unless ``check_schedule_on_load`` is
        ``False``; ``lvlb_weights`` is dropped without comparison (CompVis' x0 weights carry a precedence slip).
        """
        schedule = self.noise_schedule
        for name in SCHEDULE_TABLES:
            stored = state_dict.pop(prefix + name, None)
            if stored is None or schedule is None or not self.check_schedule_on_load or name == "lvlb_weights":
                continue
            problem = schedule.stored_table_mismatch(name, stored)
            if problem is not None:
                error_msgs.append(
                    f"the state dict's schedule table {prefix + name!r} {problem} (set `check_schedule_on_load = "
                    "False` to load it anyway)"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
