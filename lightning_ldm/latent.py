r"""``LatentDiffusionMixin``: CompVis' ``LatentDiffusion`` interface on top of :class:`~lightning_ldm.DiffusionMixin`.

A frozen first stage (:class:`~lightning_ldm.first_stage.FirstStage`: encode/decode with a fixed or fitted scale),
CompVis' conditioning keys (``apply_model``) and condition dropout for classifier-free guidance, drawn from the
same per-rank, per-batch generator as ``t`` and the noise::

    class LDM(LatentDiffusionMixin, L.LightningModule):
        def __init__(self, vae, unet):
            super().__init__()
            self.register_schedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
            self.register_first_stage(vae, scale_by_std=True)
            self.register_conditioning("crossattn", dropout=0.1)
            self.model = unet  # apply_model calls self.model(x, t, context=...), or a diffusers UNet with
                               # encoder_hidden_states=... (and returns its .sample)

        def training_step(self, batch, batch_idx):
            return self.diffusion_loss(batch["image"], batch["context"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.trainable_parameters(), lr=1e-4)

Code written against CompVis' ``LatentDiffusion`` (its samplers read ``apply_model``, ``num_timesteps``, the table
names and ``parameterization``) runs against such a module unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_ldm._checks import check_choice, check_real, check_shape
from lightning_ldm.call_convention import CALL_CONVENTIONS, call_denoiser, resolve_call_convention
from lightning_ldm.conditioning import (
    COND_DICT_KEYS,
    CONDITIONING_KEYS,
    apply_conditioned,
    as_cond_dict,
    drop_conditions,
)
from lightning_ldm.first_stage import FirstStage
from lightning_ldm.mixin import DiffusionMixin

__all__ = ["LatentDiffusionMixin"]

_KEY_USES = {"concat": ("c_concat",), "crossattn": ("c_crossattn",), "hybrid": COND_DICT_KEYS, "adm": ("c_crossattn",)}


class LatentDiffusionMixin(DiffusionMixin):
    """Latent diffusion for a ``LightningModule``: ``class M(LatentDiffusionMixin, L.LightningModule)``.

    Attributes: ``first_stage`` (set by :meth:`register_first_stage`), ``conditioning_key``, ``call_convention`` and
    the dropout settings (set by :meth:`register_conditioning`), ``denoiser_name`` (the attribute
    :meth:`apply_model` calls, ``"model"`` as in CompVis).
    """

    conditioning_key: str | None = None
    denoiser_name: str | None = "model"
    _cond_dropout: dict[str, float] = {}  # noqa: RUF012 - replaced per instance
    _null_cond: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance

    @property
    def first_stage(self) -> FirstStage | None:
        """The registered :class:`FirstStage` (a submodule), ``None`` before :meth:`register_first_stage`."""
        stage = self._modules.get("first_stage")
        return stage if isinstance(stage, FirstStage) else None

    def register_first_stage(self, autoencoder: nn.Module, **options: Any) -> FirstStage:
        """Wrap ``autoencoder`` in a frozen :class:`FirstStage` (``options`` are its keyword arguments) and keep it.

        The first stage is a submodule (it follows ``.to(device)`` and its scale factor is saved in checkpoints);
        its weights never train: leave them out of the optimizer with :meth:`trainable_parameters`.

        Raises:
            TypeError: ``autoencoder`` lacks a callable ``encode``/``decode``, or an option has the wrong type.
            ValueError: An option is out of range.
        """
        stage = FirstStage(autoencoder, **options)
        nn.Module.__setattr__(self, "first_stage", stage)  # registers the submodule that the property reads
        return stage

    @override
    def on_fit_start(self) -> None:
        """Let Lightning's fit-start check see the frozen first stages in training mode; ``super()`` first.

        Lightning warns "Found N module(s) in eval mode at the start of training" between ``on_fit_start`` and
        ``on_train_start``, and a frozen first stage is in eval mode on purpose. Its autoencoder's flags are raised
        here and lowered again in :meth:`on_train_start`; it computes in eval mode regardless
        (:class:`FirstStage` puts it back before every encode and decode).
        """
        super().on_fit_start()
        for module in self.modules():
            if isinstance(module, FirstStage):
                for sub in module.autoencoder.modules():  # flags only: CompVis disables a frozen stage's train()
                    sub.training = True

    @override
    def on_train_start(self) -> None:
        """Put every frozen first stage back in eval mode (see :meth:`on_fit_start`), then call ``super()``."""
        for module in self.modules():
            if isinstance(module, FirstStage):
                nn.Module.train(module.autoencoder, False)  # not its own train(): CompVis disables that
        super().on_train_start()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write every first stage's factor in use over the checkpoint's state dict, then call ``super()``.

        Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) replaces ``checkpoint["state_dict"]`` with its
        averaged copy of the module, made at fit start, before :meth:`FirstStage.fit_scale` ran: without this the
        checkpoint would carry the copy's never-fitted factor. The fitted scale is first-stage state, not a trained
        weight; the live module's is the one in use. This hook runs after every callback's ``on_save_checkpoint``
        (and also for ``save_weights_only=True``, which skips the callbacks').
        """
        state = checkpoint.get("state_dict")
        if isinstance(state, MutableMapping):
            for name, module in self.named_modules():
                prefix = f"{name}." if name else ""
                if isinstance(module, FirstStage) and prefix + "scale_factor" in state:
                    module.store_scale(state, prefix)
        super().on_save_checkpoint(checkpoint)

    def register_conditioning(
        self,
        conditioning_key: str | None,
        *,
        dropout: float | Mapping[str, float] = 0.0,
        null: Mapping[str, Any] | None = None,
        call_convention: str = "auto",
    ) -> None:
        """Set CompVis' conditioning key, the denoiser's call convention and the condition dropout of guidance training.

        Args:
            conditioning_key: ``"concat"``, ``"crossattn"``, ``"hybrid"``, ``"adm"`` or ``None`` (unconditional).
            dropout: Probability in [0, 1] that a training sample's condition is replaced by the null condition: one
                number for every key the conditioning uses, or a mapping ``{"c_concat": p, "c_crossattn": q}``.
            null: Null condition per key (``"c_concat"``/``"c_crossattn"``), e.g. the empty prompt's embedding;
                zeros where none is given. Shapes: per sample, batch 1, or the batch's.
            call_convention: How :meth:`apply_model` calls ``self.<denoiser_name>``: ``"compvis"`` (``context=``,
                ``y=``), ``"diffusers"`` (``encoder_hidden_states=``, ``class_labels=``; the output's ``.sample``) or
                ``"auto"``, read from the network's ``forward`` signature (see
                :mod:`~lightning_ldm.call_convention`). Kept in the ``call_convention`` attribute.

        Raises:
            ValueError: An unknown key or call convention, a probability outside [0, 1], or a dropout/null key the
                conditioning does not use.
            TypeError: A probability is not a real number.
        """
        if conditioning_key is not None:
            check_choice("conditioning_key", conditioning_key, CONDITIONING_KEYS)
        check_choice("call_convention", call_convention, CALL_CONVENTIONS)
        uses = _KEY_USES.get(conditioning_key or "", ())
        probs = dict.fromkeys(uses, dropout) if not isinstance(dropout, Mapping) else dict(dropout)
        for name, given in (("dropout", probs), ("null", dict(null or {}))):
            unused = sorted(set(given) - set(uses))
            if unused:
                raise ValueError(
                    f"{name} names {unused}, which conditioning_key={conditioning_key!r} does not use; expected keys "
                    f"among {list(uses)}"
                )
        self._cond_dropout = {k: check_real(f"dropout[{k!r}]", p, minimum=0.0, maximum=1.0) for k, p in probs.items()}
        self._null_cond = dict(null or {})
        self.conditioning_key = conditioning_key
        self.call_convention = call_convention

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that require grad (the frozen first stage's are left out): what the optimizer should get."""
        return (p for p in self.parameters() if p.requires_grad)

    def _require_first_stage(self) -> FirstStage:
        if self.first_stage is None:
            raise RuntimeError(f"{type(self).__name__} has no first stage: call self.register_first_stage(...) first")
        return self.first_stage

    def encode_first_stage(self, x: Tensor) -> Tensor:
        """Scaled latents of ``x``; on the first training batch with ``scale_by_std``, fit the scale first.

        The posterior is sampled with ``diffusion_generator`` (the per-rank, per-batch generator), so resumed runs
        draw the same latents. The scale is fitted once, on every DDP rank, from the latents pooled over ranks.
        (With :class:`~lightning_ldm.compat.CompVisCompat` mixed in, ``encode_first_stage`` is CompVis' and returns the
        posterior; :meth:`diffusion_loss` encodes here either way.)
        """
        return self._encode_latents(x)

    def _encode_latents(self, x: Tensor) -> Tensor:
        stage = self._require_first_stage()
        if self.training and stage.needs_scale_fit:
            raw = stage.encode(x, generator=self.diffusion_generator, scaled=False)
            stage.fit_scale(raw)
            return stage.scale_latents(raw).to(raw.dtype)
        return stage.encode(x, generator=self.diffusion_generator)

    def decode_first_stage(self, z: Tensor) -> Tensor:
        """Decode scaled latents ``z`` with the first stage."""
        return self._require_first_stage().decode(z)

    def _check_latent_channels(self, shape: tuple[int, ...]) -> None:
        """Refuse a ``shape`` whose channels are not the denoiser's ``in_channels`` (without concatenated conditions).

        Read from a diffusers ``config.in_channels`` or a CompVis ``in_channels`` attribute; nothing to check when the
        denoiser has neither or a ``"concat"``/``"hybrid"`` condition adds channels.
        """
        if self.conditioning_key in ("concat", "hybrid") or len(shape) < 2:
            return
        denoiser = getattr(self, self.denoiser_name or "model", None)
        config = getattr(denoiser, "config", None)  # diffusers; else CompVis' attribute (diffusers warns on that one)
        channels = getattr(config if config is not None else denoiser, "in_channels", None)
        if isinstance(channels, int) and shape[1] != channels:
            raise ValueError(
                f"shape={shape} is the shape of the latents, batch first: expected shape[1]={channels}, the "
                f"in_channels of {type(denoiser).__name__}"
                + (" (the first stage decodes the latents to images)" if self.first_stage is not None else "")
            )

    def apply_model(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """CompVis' ``apply_model``: route ``cond`` into ``self.<denoiser_name>`` by ``conditioning_key``.

        ``cond`` is a tensor, a list of tensors, or CompVis' dict ``{"c_concat": [...], "c_crossattn": [...]}``
        (see :func:`~lightning_ldm.conditioning.apply_conditioned`). A diffusers UNet (or a network with its call
        convention) gets the conditions as ``encoder_hidden_states=``/``class_labels=`` and its ``.sample`` is returned
        (``call_convention``, set by :meth:`register_conditioning`).

        Raises:
            ValueError: A condition the conditioning key does not use, or shapes that do not concatenate.
            TypeError: The denoiser does not take the keyword the condition is routed to.
        """
        denoiser = getattr(self, self.denoiser_name or "model")
        convention = resolve_call_convention(denoiser, self.call_convention)
        if self.conditioning_key is None and cond is None:
            return call_denoiser(denoiser, x_t, t, convention)
        cond_dict = as_cond_dict(cond, self.conditioning_key)
        return apply_conditioned(denoiser, x_t, t, cond_dict, self.conditioning_key, call_convention=convention)

    def drop_conditions(self, cond: Any) -> Any:
        """In training mode, replace conditions by the null condition per sample with the registered probabilities.

        Drawn from ``diffusion_generator``, which ``DiffusionSeedCallback`` seeds per rank and per batch: each rank
        draws its own masks, a function of ``(seed, rank, batch counter)`` only, so a resumed run draws them again.
        Returns ``cond`` unchanged in eval mode or without dropout.
        """
        if not self.training or not self._cond_dropout or cond is None:
            return cond
        cond_dict = as_cond_dict(cond, self.conditioning_key)
        dropped, _ = drop_conditions(cond_dict, self._cond_dropout, self._null_cond, generator=self.diffusion_generator)
        return dropped

    def diffusion_loss(
        self, x_start: Tensor, cond: Any = None, *, encode: bool = True, **loss_options: Any
    ) -> Tensor:
        """The training loss of a latent diffusion model: encode, drop conditions, then the denoising loss.

        The draws come in a fixed order from ``diffusion_generator``: the posterior sample, the dropout masks, ``t``,
        then the noise.

        Args:
            x_start: Images (``encode=True``) or latents (``encode=False``).
            cond: The condition (see :meth:`apply_model`).
            encode: Encode ``x`` with the first stage first.
            **loss_options: Keyword arguments of :meth:`DiffusionMixin.diffusion_loss` (``loss_weighting``, ``t``,
                ``noise``, ...).

        Returns:
            Scalar float32 loss.
        """
        z = self._encode_latents(x_start) if encode else x_start
        return super().diffusion_loss(z, self.drop_conditions(cond), **loss_options)

    @torch.no_grad()
    def sample(
        self, shape: Any, *, decode: bool = True, **sample_options: Any
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Sample latents with :meth:`DiffusionMixin.sample` through :meth:`apply_model`, then decode them.

        ``cond``/``uncond`` are given in any form :meth:`apply_model` takes (dicts of lists included); with
        ``guidance_scale != 1`` both run as one batch.

        Args:
            shape: Latent shape, batch first.
            decode: Decode with the first stage (when one is registered).
            **sample_options: Keyword arguments of :meth:`DiffusionMixin.sample` (``sampler``, ``num_steps``,
                ``guidance_scale``, ``cond``, ``uncond``, ``generator``, ``x_T``, ...).

        Returns:
            Images (decoded) or latents; with ``return_intermediates=True``, ``(samples, intermediates)`` whose
            intermediates stay latents.

        Raises:
            TypeError: ``shape`` holds a non-integer, or an argument of :meth:`DiffusionMixin.sample` has the wrong
                type.
            ValueError: :meth:`DiffusionMixin.sample` refuses an argument (a scheduler that does not match the
                schedule, ...).
        """
        self._check_latent_channels(check_shape("shape", shape))
        out = super().sample(shape, **sample_options)
        if not decode or self.first_stage is None:
            return out
        z, intermediates = out if isinstance(out, tuple) else (out, None)
        with self._precision_context(sample_options.get("precision")):
            images = self.decode_first_stage(z)
        return images if intermediates is None else (images, intermediates)
