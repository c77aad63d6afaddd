r"""``DiffusionMixin``: a thin adapter from a ``LightningModule`` to the functional core.

Mix it in **before** ``LightningModule`` and register a schedule in ``__init__``::

    class Denoiser(DiffusionMixin, L.LightningModule):
        def __init__(self, timesteps: int = 1000):
            super().__init__()
            self.save_hyperparameters()
            self.register_schedule(beta_schedule="linear", timesteps=timesteps)
            self.net = TinyUNet()

        def training_step(self, batch, batch_idx):
            return self.diffusion_loss(self.net, batch)

The schedule is a :class:`~lightning_ldm.noise_schedule.NoiseSchedule` kept as a plain attribute
(:attr:`~DiffusionMixin.noise_schedule`), not as buffers: precision flags, ``.half()``, EMA averaging, DDP broadcasts
and meta-device initialization cannot touch it, and checkpoints carry its fingerprint instead of its tables. CompVis'
table names (``betas``, ``alphas_cumprod``, …, ``lvlb_weights``) stay readable on the module, in the schedule's table
dtype on the module's device. The maths lives in :mod:`~lightning_ldm.noise_schedule`, :mod:`~lightning_ldm.losses`,
:mod:`~lightning_ldm.guidance` and :mod:`~lightning_ldm.ddim`; the mixin draws the random numbers (from
:attr:`~DiffusionMixin.diffusion_generator` when ``ScheduleCallback`` installs one), applies the Trainer's precision
when sampling, and guards checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ldm import losses
from lightning_ldm._checks import check_floating, check_real, check_scheduler, check_shape
from lightning_ldm.checkpointing import checkpoint as _checkpoint
from lightning_ldm.ddim import ddim_sample as _ddim_sample
from lightning_ldm.embedding import timestep_embedding
from lightning_ldm.guidance import Conditioning, eval_mode, guided_model
from lightning_ldm.losses import LossType, LossWeighting
from lightning_ldm.noise_schedule import Parameterization
from lightning_ldm.schedule_holder import CHECKPOINT_KEY, ScheduleHolder
from lightning_ldm.scheduler_sampling import scheduler_sample
from lightning_ldm.validation import fixed_timestep_losses, log_timestep_losses

# LossType, LossWeighting and Parameterization stay importable from here, where v0.1 defined them.
__all__ = ["CHECKPOINT_KEY", "DiffusionMixin", "LossType", "LossWeighting", "Parameterization"]


class DiffusionMixin(ScheduleHolder):
    r"""Diffusion training and sampling for a ``LightningModule``: ``class M(DiffusionMixin, L.LightningModule)``.

    The mixin has no ``__init__``; every Lightning hook it overrides calls ``super()``. Attributes:
    :attr:`noise_schedule` (set by :meth:`register_schedule`), ``timestep_sampler`` (``None``: uniform; else an object
    with ``sample(batch_size, num_timesteps, device, generator)``), ``diffusion_generator`` (the ``torch.Generator``
    that timesteps and noise are drawn from; the global RNG when ``None``), ``last_timestep_losses`` (``(t,
    per-sample loss)`` of the last training :meth:`diffusion_loss`), ``use_checkpoint`` and
    ``checkpoint_use_reentrant`` (for :meth:`checkpointed`), ``check_schedule_on_load`` (compare the schedule of a
    loaded checkpoint; ``False`` opts out).
    """

    use_checkpoint: bool = False
    checkpoint_use_reentrant: bool = False
    timestep_sampler: Any = None
    diffusion_generator: torch.Generator | None = None
    last_timestep_losses: tuple[Tensor, Tensor] | None = None

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Diffuse ``x_start`` to ``t`` (:meth:`NoiseSchedule.q_sample`); ``noise`` drawn if ``None``."""
        return self.require_schedule().q_sample(x_start, t, self.sample_noise(x_start) if noise is None else noise)

    # ----------------------------------------------------------------------------------------- random draws
    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Draw one training timestep per sample (LongTensor ``(batch_size,)``, on ``device`` or the tables' device).

        Uniform on ``[0, T)`` unless a ``timestep_sampler`` is installed; drawn from ``diffusion_generator`` when set.

        Raises:
            ValueError: The installed sampler returned something that is not a ``(batch_size,)`` integer tensor.
            RuntimeError: No schedule is registered.
        """
        steps = self.num_timesteps
        target = torch.device(device) if device is not None else self.schedule_device
        generator = self.diffusion_generator
        if self.timestep_sampler is not None:
            t = self.timestep_sampler.sample(batch_size, steps, target, generator)
            if not isinstance(t, Tensor) or t.shape != (batch_size,) or t.dtype.is_floating_point:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"timestep_sampler {type(self.timestep_sampler).__name__}.sample returned {shape}; expected a "
                    f"LongTensor of shape ({batch_size},)"
                )
            return t.to(device=target, dtype=torch.long)
        draw_device = generator.device if generator is not None else target
        return torch.randint(0, steps, (batch_size,), device=draw_device, generator=generator).to(target)

    def sample_noise(self, like: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of ``like``'s shape, drawn in float32 (from ``diffusion_generator`` if set)."""
        generator = self.diffusion_generator
        draw_device = generator.device if generator is not None else like.device
        noise = torch.randn(like.shape, device=draw_device, dtype=torch.float32, generator=generator)
        return noise.to(device=like.device, dtype=like.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------------------------------------ loss
    def diffusion_loss(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        loss_type: LossType = "l2",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ) -> Tensor:
        r"""The denoising loss of ``model(x_t, t, **model_kwargs)`` (see :func:`lightning_ldm.losses.diffusion_loss`).

        ``t`` and ``noise`` are drawn when ``None`` (:meth:`sample_timesteps`; :meth:`sample_noise` in float32). When
        ``t`` is drawn by a ``timestep_sampler`` whose ``importance_weights(t, T)`` returns weights, the mean is taken
        of the per-sample losses times those weights. In training mode, ``(t, per-sample loss)`` (detached, before the
        importance weights) is kept in ``last_timestep_losses`` for callbacks.

        Args:
            model: The network.
            x_start: Clean samples ``(B, ...)``.
            t: Timesteps ``(B,)``.
            noise: Noise of ``x_start``'s shape.
            model_kwargs: Extra keyword arguments for ``model`` (e.g. conditioning).
            loss_type: ``"l2"`` or ``"l1"``.
            loss_weighting: ``"none"``, ``"min_snr"`` or ``"vlb"``.
            min_snr_gamma: γ of Min-SNR weighting, > 0.
            offset_noise: Scale of offset noise added to ``noise``: one ``N(0, 1)`` value per sample and channel.

        Returns:
            Scalar float32 loss.

        Raises:
            TypeError: ``x_start`` or ``noise`` is not a floating tensor, or ``t`` is not an integer tensor.
            ValueError: An argument is not accepted, or the shapes disagree.
        """
        schedule = self.require_schedule()
        offset_noise = check_real("offset_noise", offset_noise, minimum=0.0)
        check_floating("x_start", x_start, min_ndim=1)
        if offset_noise > 0.0 and x_start.ndim < 2:
            raise ValueError(
                f"offset_noise needs samples with a channel dimension (B, C, ...), got {tuple(x_start.shape)}"
            )
        drawn = t is None
        t = self.sample_timesteps(x_start.shape[0], device=x_start.device) if t is None else t
        noise = self.sample_noise(x_start, dtype=torch.float32) if noise is None else noise
        if offset_noise > 0.0:
            offset = self.sample_noise(
                x_start.new_empty(x_start.shape[:2] + (1,) * (x_start.ndim - 2)), dtype=noise.dtype
            )
            noise = noise + offset_noise * offset
        importance = getattr(self.timestep_sampler, "importance_weights", None) if drawn else None
        scale = importance(t, schedule.num_timesteps) if importance is not None else None
        loss, per_sample = losses.diffusion_loss(
            model,
            schedule,
            x_start,
            t,
            noise,
            model_kwargs=model_kwargs,
            loss_type=loss_type,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
            importance_weights=None if scale is None else scale.to(x_start.device),
        )
        if self.training:
            self.last_timestep_losses = (t.detach(), per_sample.detach())
        return loss

    def apply_model(self, x_t: Tensor, t: Tensor, cond: Any = None, **kwargs: Any) -> Tensor:
        """The denoiser call that samplers make (CompVis' name): ``self(x_t, t, cond=cond, **kwargs)``.

        ``cond`` is passed on only when it is not ``None``. :class:`~lightning_ldm.latent.LatentDiffusionMixin`
        overrides it to route ``cond`` by CompVis' conditioning keys.
        """
        return self(x_t, t, **kwargs) if cond is None else self(x_t, t, cond=cond, **kwargs)

    def fixed_timestep_loss(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        timesteps: Sequence[int],
        *,
        batch_index: int,
        seed: int = 0,
        dataloader_index: int = 0,
        model_kwargs: Mapping[str, Any] | None = None,
        prefix: str = "val/loss",
    ) -> dict[int, Tensor]:
        """Validation loss at each of ``timesteps`` with fixed noise, logged per t and as a mean.

        The noise depends on ``(seed, dataloader_index, batch_index, t)`` only (see
        :func:`lightning_ldm.validation.fixed_noise`), so the numbers are the same in every run and on every rank.
        Logged as ``f"{prefix}/t={t}"`` and ``f"{prefix}/mean"`` per epoch, averaged over ranks.

        Returns:
            ``{t: loss}``.
        """
        losses = fixed_timestep_losses(
            lambda x, t, n: self.diffusion_loss(model, x, t=t, noise=n, model_kwargs=model_kwargs),
            x_start,
            timesteps,
            seed=seed,
            batch_index=batch_index,
            dataloader_index=dataloader_index,
            num_timesteps=self.num_timesteps,
        )
        log_timestep_losses(self, losses, prefix=prefix, batch_size=x_start.shape[0])
        return losses

    # --------------------------------------------------------------------------- embedding and checkpointing
    def embed_timesteps(self, t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
        """Sinusoidal embedding of ``t``, float32 ``(B, dim)``, cos first (:func:`~lightning_ldm.timestep_embedding`).

        Computed outside the module tree (nothing in the ``state_dict``, nothing a precision flag could cast), from
        the function's cached tables; traced into one graph under ``torch.compile``.
        """
        return timestep_embedding(t, dim, max_period)

    def checkpointed(
        self,
        func: Callable[..., Any],
        *inputs: Any,
        params: Iterable[Tensor] | None = None,
        use_reentrant: bool | None = None,
    ) -> Any:
        """Run ``func(*inputs)`` through :func:`lightning_ldm.checkpoint` when ``use_checkpoint`` is on.

        The non-reentrant engine is the default (``checkpoint_use_reentrant = False``): it works with DDP's
        ``find_unused_parameters=True`` and gives gradients to every parameter ``func`` uses. The reentrant one
        (CompVis' ``CheckpointFunction``) gives gradients to ``params`` only: by default the parameters of ``func``
        (or of the module of a bound method), else all of this module's.
        """
        flag = bool(self.use_checkpoint)
        reentrant = self.checkpoint_use_reentrant if use_reentrant is None else use_reentrant
        if params is None and flag and reentrant:
            owner = func if isinstance(func, nn.Module) else getattr(func, "__self__", None)
            params = owner.parameters() if isinstance(owner, nn.Module) else self.parameters()
        return _checkpoint(func, inputs, tuple(params or ()), flag, use_reentrant=reentrant)

    # ----------------------------------------------------------------------------------------------- sampling
    def _precision_context(self) -> contextlib.AbstractContextManager[Any]:
        trainer = getattr(self, "_trainer", None)
        return contextlib.nullcontext() if trainer is None else trainer.precision_plugin.forward_context()

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Callable[..., Tensor] | None,
        shape: Sequence[int],
        *,
        num_steps: int = 50,
        method: str = "uniform",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        cond: Conditioning = None,
        uncond: Conditioning = None,
        model_kwargs: Mapping[str, Any] | None = None,
        return_intermediates: bool = False,
        x_T: Tensor | None = None,  # noqa: N803 (the DDIM papers' and the core's name)
        clip_x0: float | None = None,
        scheduler: Any = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        r"""Sample with DDIM (:func:`~lightning_ldm.ddim.ddim_sample`) and classifier-free guidance.

        Runs under ``torch.no_grad()`` with ``model`` in eval mode (modes restored afterwards) and, on a Trainer,
        under ``trainer.precision_plugin.forward_context()``. ``x_T`` is drawn in float32 from ``generator`` (the
        global RNG when ``None``; never ``diffusion_generator``, so sampling does not shift the training draws) and
        cast to the default dtype of that context.

        Args:
            model: The network, called as ``model(x_t, t, **model_kwargs, **cond_kwargs)``; ``None`` for
                :meth:`apply_model`.
            shape: Shape of the samples, batch first.
            num_steps: Number of DDIM steps.
            method: ``"uniform"``, ``"quad"``, ``"linspace"`` or ``"trailing"``.
            eta: DDIM η (0: deterministic).
            generator: Generator for ``x_T`` and the η noise.
            guidance_scale: Classifier-free guidance scale.
            cond: Conditioning (tensor passed as ``cond=``, or keyword mapping).
            uncond: Unconditional conditioning, needed when ``guidance_scale != 1``.
            model_kwargs: Keyword arguments for every model call.
            return_intermediates: Also return ``{"x_inter": [...], "pred_x0": [...]}``.
            x_T: Starting noise of shape ``shape`` (drawn when ``None``).
            clip_x0: Clamp the predicted x0 to ``[-clip_x0, clip_x0]``.
            scheduler: A diffusers-style scheduler (DPM-Solver++, Euler, UniPC, ...) built from
                ``noise_schedule.to_diffusers_config()``, run instead of our DDIM (see
                :func:`~lightning_ldm.scheduler_sampling.scheduler_sample`; ``method`` and ``clip_x0`` do not
                apply, ``return_intermediates`` is refused); one with another ``ā``, T or parameterization is refused.

        Returns:
            Samples (in ``x_T``'s dtype), or ``(samples, intermediates)``.

        Raises:
            ValueError: A bad ``shape`` or ``x_T``, guidance without ``uncond``/``cond``, a scheduler that does not
                match the schedule, or an argument rejected by the DDIM core.
            TypeError: ``cond``/``uncond`` is neither a tensor, a mapping nor ``None``, or ``shape`` holds a
                non-integer.
        """
        shape = check_shape("shape", shape)
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected shape {shape}")
        if scheduler is not None:
            check_scheduler(scheduler, self.require_schedule())
            if return_intermediates:
                raise ValueError("return_intermediates=True is not supported with a scheduler; use scheduler=None")
        model_fn = guided_model(
            self.apply_model if model is None else model,
            shape[0],
            guidance_scale=guidance_scale,
            cond=cond,
            uncond=uncond,
            model_kwargs=model_kwargs,
        )
        alphas_cumprod = self.alphas_cumprod
        with eval_mode(self if model is None else model), self._precision_context():
            device = alphas_cumprod.device
            if x_T is None:
                draw_device = generator.device if generator is not None else device
                x_T = torch.randn(shape, device=draw_device, dtype=torch.float32, generator=generator)
                x_T = x_T.to(device=device, dtype=torch.get_default_dtype())
            else:
                x_T = x_T.to(device)
            if scheduler is not None:
                return scheduler_sample(model_fn, x_T, scheduler, num_steps=num_steps, eta=eta, generator=generator)
            sampler: Callable[..., Any] = _ddim_sample  # one call for both overloads
            return sampler(
                model_fn,
                x_T,
                alphas_cumprod,
                num_steps=num_steps,
                method=method,
                eta=eta,
                parameterization=self.parameterization,
                generator=generator,
                clip_x0=clip_x0,
                return_intermediates=return_intermediates,
            )
