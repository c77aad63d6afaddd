r"""``DiffusionMixin``: a slim adapter from a ``LightningModule`` to the functional core.

Mix it in **before** ``LightningModule``, register a schedule in ``__init__``, and return :meth:`diffusion_loss`
from ``training_step``::

    class Denoiser(DiffusionMixin, L.LightningModule):
        def __init__(self, timesteps: int = 1000):
            super().__init__()
            self.save_hyperparameters()
            self.register_schedule(beta_schedule="linear", timesteps=timesteps)
            self.net = TinyUNet()

        def forward(self, x_t, t):
            return self.net(x_t, t)

        def training_step(self, batch, batch_idx):
            return self.diffusion_loss(batch)

The schedule is a :class:`~lightning_ldm.noise_schedule.NoiseSchedule` kept as a plain attribute
(:attr:`~DiffusionMixin.noise_schedule`), not as buffers: precision flags, ``.half()``, EMA averaging, DDP broadcasts
and meta-device initialization cannot touch it, and checkpoints carry its fingerprint instead of its tables. The
maths lives in the core (:mod:`~lightning_ldm.losses`, :mod:`~lightning_ldm.ddim`, :mod:`~lightning_ldm.guidance`);
the mixin draws the random numbers (from :attr:`~DiffusionMixin.diffusion_generator` when ``DiffusionSeedCallback``
installs one), applies the Trainer's precision when sampling, and guards checkpoints. CompVis' names (the schedule
tables, ``q_sample``, ``num_timesteps``, ...) are opt-in: :class:`~lightning_ldm.compat.CompVisCompat`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ldm._checks import (
    check_bool,
    check_choice,
    check_floating,
    check_real,
    check_same_shape,
    check_sampler,
    check_samples,
    check_scheduler,
    check_shape,
    check_timesteps,
)
from lightning_ldm.call_convention import accepts_keyword, call_denoiser, resolve_call_convention, unwrap_output
from lightning_ldm.ddim import ddim_sample, make_ddim_timesteps
from lightning_ldm.guidance import eval_mode, guided_condition
from lightning_ldm.losses import LossType, _diffusion_loss, check_loss_options
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.parameterization import LossWeighting, Parameterization
from lightning_ldm.schedule_config import ScheduleConfig, fingerprint_difference
from lightning_ldm.scheduler_sampling import scheduler_loop
from lightning_ldm.validation import fixed_timestep_losses, log_timestep_losses

if TYPE_CHECKING:
    import lightning.pytorch as L

    _Base = L.LightningModule
else:
    _Base = object

__all__ = ["CHECKPOINT_KEY", "SAMPLE_PRECISIONS", "DiffusionMixin"]

#: Key of the package's entry in a Lightning checkpoint dict; the fingerprint sits under ``["schedule"]``.
CHECKPOINT_KEY = "lightning_ldm"


#: The precisions ``sample(precision=...)`` takes: Lightning's names of float32 and of the autocast ones.
SAMPLE_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_PRECISION_ALIASES: dict[int | str, str] = {
    32: "32-true", "32": "32-true", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed"
}  # fmt: skip


def _sample_precision(precision: str | int | None) -> str | None:
    """``precision`` as one of :data:`SAMPLE_PRECISIONS` (Lightning's short names mapped), or ``None``; else raise."""
    if precision is None:
        return None
    if isinstance(precision, (int, str)):  # Lightning's short names: 32, "16", "bf16"
        precision = _PRECISION_ALIASES.get(precision, precision)
    check_choice("precision", precision, SAMPLE_PRECISIONS)
    return str(precision)


class DiffusionMixin(_Base):
    r"""Diffusion training and sampling for a ``LightningModule``: ``class M(DiffusionMixin, L.LightningModule)``.

    The mixin has no ``__init__``; every Lightning hook it overrides calls ``super()``. Attributes you may set:

    * ``denoiser_name``: the attribute that holds the network (``None``, the default: the module itself, called as
      ``self(x_t, t, ...)``; :class:`~lightning_ldm.latent.LatentDiffusionMixin` uses ``"model"``, as CompVis);
    * ``call_convention``: how :meth:`apply_model` calls that network: ``"auto"`` (the default: from its ``forward``
      signature), ``"compvis"`` or ``"diffusers"`` (a diffusers UNet: a Tensor condition goes to
      ``encoder_hidden_states=``, or ``class_labels=`` when the network takes no ``encoder_hidden_states``; the
      output's ``.sample`` is returned; see :mod:`~lightning_ldm.call_convention`);
    * ``timestep_sampler``: ``None`` (uniform) or an object with ``sample(batch_size, num_timesteps, device,
      generator)`` (``DiffusionSeedCallback`` installs one);
    * ``diffusion_generator``: the ``torch.Generator`` that t, the noise and condition dropout are drawn from (the
      global RNG when ``None``; ``DiffusionSeedCallback`` seeds one per rank and batch);
    * ``check_schedule_on_load``: compare the schedule of a loaded checkpoint (``False`` opts out).

    Read: :attr:`noise_schedule` and ``last_timestep_losses`` (``(t, per-sample loss)`` of the last training
    :meth:`diffusion_loss`, for callbacks; cleared at the start of every fit).
    """

    noise_schedule: NoiseSchedule | None = None
    denoiser_name: str | None = None
    call_convention: str = "auto"
    timestep_sampler: Any = None
    diffusion_generator: torch.Generator | None = None
    last_timestep_losses: tuple[Tensor, Tensor] | None = None
    check_schedule_on_load: bool = True
    _pending_schedule_fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ schedule
    def register_schedule(
        self,
        given_betas: np.ndarray | Tensor | Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        *,
        zero_terminal_snr: bool = False,
        v_posterior: float = 0.0,
        parameterization: Parameterization = "eps",
        table_dtype: torch.dtype = torch.float32,
        schedule: NoiseSchedule | ScheduleConfig | None = None,
    ) -> None:
        r"""Set the noise schedule (CompVis ``register_schedule`` arguments; see :class:`ScheduleConfig`).

        Args:
            given_betas: Explicit betas; when given, ``beta_schedule``, ``timesteps`` and the schedule parameters are
                ignored, as in CompVis.
            beta_schedule: ``"linear"``, ``"cosine"``, ``"squaredcos_cap_v2"``, ``"sqrt_linear"`` or ``"sqrt"``.
            timesteps: Number of training timesteps T (>= 2).
            linear_start: First beta of the linear-type schedules.
            linear_end: Last beta of the linear-type schedules.
            cosine_s: Offset ``s`` of the cosine schedule.
            zero_terminal_snr: Rescale the betas so the last ``ā`` is 0 (Lin et al. 2023).
            v_posterior: Weight ``v`` of ``β`` in the posterior variance, in [0, 1].
            parameterization: What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
            table_dtype: ``torch.float32`` (default) or ``torch.float64``.
            schedule: A ready :class:`NoiseSchedule` or :class:`ScheduleConfig`, used instead of the arguments above.

        Raises:
            TypeError: The class lists ``DiffusionMixin`` after ``nn.Module``, or an argument has the wrong type.
            ValueError: An argument is not accepted, or the checkpoint loaded before this call holds another schedule.
        """
        self._check_mro()
        if not isinstance(schedule, NoiseSchedule):
            if schedule is None:
                schedule = ScheduleConfig(
                    beta_schedule=beta_schedule,  # type: ignore[arg-type]
                    timesteps=timesteps,
                    linear_start=linear_start,
                    linear_end=linear_end,
                    cosine_s=cosine_s,
                    zero_terminal_snr=zero_terminal_snr,
                    v_posterior=v_posterior,
                    parameterization=parameterization,
                    given_betas=given_betas,  # type: ignore[arg-type]
                )
            schedule = NoiseSchedule(schedule, table_dtype=table_dtype)
        if schedule.config.zero_terminal_snr and schedule.parameterization == "eps":
            rank_zero_warn(
                "register_schedule(zero_terminal_snr=True, parameterization='eps'): at the terminal step ā = 0, so an "
                "ε-prediction carries no information about x0 there and DDIM 'trailing' sampling (which starts there) "
                "refuses it; Lin et al. 2023 pair zero terminal SNR with parameterization='v'",
                category=UserWarning,
            )
        pending = self._pending_schedule_fingerprint
        if pending is not None and self.check_schedule_on_load:
            self._raise_on_mismatch(pending, schedule.fingerprint)
        self.noise_schedule = schedule
        self._pending_schedule_fingerprint = None

    def _require_schedule(self) -> NoiseSchedule:
        if self.noise_schedule is None:
            raise RuntimeError(
                f"{type(self).__name__} has no noise schedule: call self.register_schedule(...) in __init__ first"
            )
        return self.noise_schedule

    @property
    def _schedule_device(self) -> torch.device:
        """Where the module's tables are used: the device of its first parameter or buffer (CPU if none, or meta)."""
        device = getattr(self, "_device", None)  # kept by LightningModule
        if device is None:
            for tensor in (*self.parameters(), *self.buffers()):
                device = tensor.device
                break
        return torch.device("cpu") if device is None or device.type == "meta" else device

    def _check_mro(self) -> None:
        if not isinstance(self, nn.Module):
            raise TypeError(
                f"{type(self).__name__} must subclass torch.nn.Module (e.g. class M(DiffusionMixin, L.LightningModule))"
            )
        mro = type(self).__mro__
        if mro.index(DiffusionMixin) > mro.index(nn.Module):
            raise TypeError(
                f"{type(self).__name__} lists DiffusionMixin after LightningModule/nn.Module, so its hooks never run; "
                "write `class M(DiffusionMixin, L.LightningModule)`"
            )

    # ----------------------------------------------------------------------------------------- random draws
    def draw_timesteps(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Draw one training timestep per sample (LongTensor ``(batch_size,)``, on ``device`` or the module's).

        Uniform on ``[0, T)`` unless a ``timestep_sampler`` is installed; drawn from ``diffusion_generator`` when set.

        Raises:
            ValueError: The installed sampler returned something that is not a ``(batch_size,)`` integer tensor of
                timesteps in ``[0, T)``.
            RuntimeError: No schedule is registered.
        """
        steps = self._require_schedule().num_timesteps
        target = torch.device(device) if device is not None else self._schedule_device
        generator = self.diffusion_generator
        if self.timestep_sampler is None:
            draw_device = generator.device if generator is not None else target
            return torch.randint(0, steps, (batch_size,), device=draw_device, generator=generator).to(target)
        t = self.timestep_sampler.sample(batch_size, steps, target, generator)
        if not isinstance(t, Tensor) or t.shape != (batch_size,) or t.dtype.is_floating_point:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"timestep_sampler {type(self.timestep_sampler).__name__}.sample returned {shape}; expected a "
                f"LongTensor of shape ({batch_size},)"
            )
        check_timesteps(t, steps, name=f"the timesteps of {type(self.timestep_sampler).__name__}")
        return t.to(device=target, dtype=torch.long)

    def draw_noise(self, like: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of ``like``'s shape, drawn in float32 (from ``diffusion_generator`` if set)."""
        generator = self.diffusion_generator
        draw_device = generator.device if generator is not None else like.device
        noise = torch.randn(like.shape, device=draw_device, dtype=torch.float32, generator=generator)
        return noise.to(device=like.device, dtype=like.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------------------------------------ model
    def apply_model(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The denoiser call that the loss and the samplers make (CompVis' name).

        The network is ``self`` or ``getattr(self, denoiser_name)``; ``cond`` is left out when ``None``, spread as
        keyword arguments when a mapping (``{"context": emb}`` → ``net(x_t, t, context=emb)``), else passed as
        ``cond=``. A network with diffusers' call convention (``call_convention``: a ``UNet2DModel`` or
        ``UNet2DConditionModel``) gets a Tensor ``cond`` as ``encoder_hidden_states=`` (``class_labels=`` when it
        takes no ``encoder_hidden_states``), a mapping spread as its keyword arguments (``{"encoder_hidden_states": e,
        "added_cond_kwargs": {...}}``), and its output's ``.sample`` is returned.
        :class:`~lightning_ldm.latent.LatentDiffusionMixin` routes ``cond`` by CompVis' conditioning keys.

        Raises:
            ValueError: ``call_convention`` is not ``"auto"``, ``"compvis"`` or ``"diffusers"``.
            TypeError: A diffusers-convention network that takes neither ``encoder_hidden_states`` nor
                ``class_labels`` got a Tensor condition.
        """
        net = self if self.denoiser_name is None else getattr(self, self.denoiser_name)
        if resolve_call_convention(net, self.call_convention) == "compvis":
            if cond is None:
                return net(x_t, t)
            if isinstance(cond, Mapping):
                return net(x_t, t, **cond)
            return net(x_t, t, cond=cond)
        if cond is None:
            return unwrap_output(net, net(x_t, t))
        if isinstance(cond, Mapping):
            return unwrap_output(net, net(x_t, t, **cond))
        role = "context" if accepts_keyword(net, "encoder_hidden_states") else "vector"
        return call_denoiser(net, x_t, t, "diffusers", **{role: cond}, routed_by="a Tensor cond")

    # ------------------------------------------------------------------------------------------------ loss
    def diffusion_loss(
        self,
        x_start: Tensor,
        cond: Any = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        loss_type: LossType = "l2",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ) -> Tensor:
        r"""The denoising loss of :meth:`apply_model` on ``x_start`` (see :func:`lightning_ldm.losses.diffusion_loss`).

        ``t`` and ``noise`` are drawn when ``None`` (:meth:`draw_timesteps`; :meth:`draw_noise` in float32). When
        ``t`` is drawn by a ``timestep_sampler`` whose ``importance_weights(t, T)`` returns weights, the mean is taken
        of the per-sample losses times those weights. In training mode, ``(t, per-sample loss)`` (detached, before the
        importance weights) is kept in ``last_timestep_losses`` for callbacks.

        Args:
            x_start: Clean samples ``(B, ...)``.
            cond: The condition, passed to :meth:`apply_model`.
            t: Timesteps ``(B,)``.
            noise: Noise of ``x_start``'s shape.
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
        schedule = self._require_schedule()
        gamma = check_loss_options(loss_type, loss_weighting, min_snr_gamma)
        offset_noise = check_real("offset_noise", offset_noise, minimum=0.0)
        check_samples("x_start", x_start)
        if offset_noise > 0.0 and x_start.ndim < 2:
            raise ValueError(
                f"offset_noise needs samples with a channel dimension (B, C, ...), got {tuple(x_start.shape)}"
            )
        importance = None
        if t is None:
            t = self.draw_timesteps(x_start.shape[0], device=x_start.device)
            weigh = getattr(self.timestep_sampler, "importance_weights", None)
            importance = None if weigh is None else weigh(t, schedule.num_timesteps)
        else:
            check_timesteps(t, schedule.num_timesteps, batch=x_start.shape[0], batch_of="x_start")
        if noise is None:
            noise = self.draw_noise(x_start, dtype=torch.float32)
        else:
            check_same_shape("x_start", x_start, "noise", check_floating("noise", noise))
        if offset_noise > 0.0:
            per_channel = x_start.new_empty(x_start.shape[:2] + (1,) * (x_start.ndim - 2))
            offset = self.draw_noise(per_channel, dtype=noise.dtype)
            noise = noise + offset_noise * offset
        loss, per_sample = _diffusion_loss(
            lambda x_t, t_: self.apply_model(x_t, t_, cond),
            schedule,
            x_start,
            t,
            noise,
            {},
            loss_type,
            loss_weighting,
            gamma,
            None if importance is None else importance.to(x_start.device),
        )
        if self.training:
            self.last_timestep_losses = (t.detach(), per_sample.detach())
        return loss

    def fixed_timestep_loss(
        self,
        x_start: Tensor,
        cond: Any = None,
        *,
        timesteps: Sequence[int],
        batch_index: int,
        seed: int = 0,
        dataloader_index: int = 0,
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
            lambda x, t, n: self.diffusion_loss(x, cond, t=t, noise=n),
            x_start,
            timesteps,
            seed=seed,
            batch_index=batch_index,
            dataloader_index=dataloader_index,
            num_timesteps=self._require_schedule().num_timesteps,
        )
        log_timestep_losses(self, losses, prefix=prefix, batch_size=x_start.shape[0])
        return losses

    # ----------------------------------------------------------------------------------------------- sampling
    def _precision_context(self, precision: str | int | None = None) -> contextlib.AbstractContextManager[Any]:
        """The context ``sample`` computes in: the Trainer's precision (``None``), or ``precision`` (see ``sample``).

        Raises:
            ValueError: ``precision`` is none of :data:`SAMPLE_PRECISIONS` or Lightning's short names of them.
        """
        precision = _sample_precision(precision)
        if precision is None:
            trainer = getattr(self, "_trainer", None)
            return contextlib.nullcontext() if trainer is None else trainer.precision_plugin.forward_context()
        if precision == "32-true":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return torch.autocast(self._schedule_device.type, dtype=dtype, cache_enabled=False)  # as Lightning's plugin

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        *,
        sampler: Literal["ddim"] | Any = "ddim",
        num_steps: int = 50,
        method: str = "uniform",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        cond: Any = None,
        uncond: Any = None,
        x_T: Tensor | None = None,  # noqa: N803 (the DDIM papers' and the core's name)
        clip_x0: float | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
        precision: str | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        r"""Draw samples through :meth:`apply_model`, with classifier-free guidance.

        DDIM by default (:func:`~lightning_ldm.ddim.ddim_sample`), or any diffusers-style scheduler object
        (DPM-Solver++, Euler, UniPC, ... built from ``noise_schedule.to_diffusers_config()``; see
        :func:`~lightning_ldm.scheduler_sampling.scheduler_sample`). Runs under ``torch.no_grad()`` with the module in
        eval mode (modes restored afterwards) and, on a Trainer, under ``trainer.precision_plugin.forward_context()``
        unless ``precision`` names another (e.g. ``"32-true"`` after a ``"bf16-mixed"`` fit).
        ``x_T`` is drawn in float32 from ``generator`` (the global RNG when ``None``; never ``diffusion_generator``,
        so sampling does not shift the training draws) and cast to the default dtype of that context.

        Args:
            shape: Shape of the samples, batch first.
            sampler: ``"ddim"`` or a diffusers-style scheduler object.
            num_steps: Number of sampling steps.
            method: DDIM step spacing: ``"uniform"``, ``"quad"``, ``"linspace"`` or ``"trailing"`` (DDIM only).
            eta: DDIM η (0: deterministic); passed to a scheduler whose ``step`` takes it.
            generator: Generator for ``x_T`` and the samplers' noise.
            guidance_scale: Classifier-free guidance scale.
            cond: The condition, in any form :meth:`apply_model` takes.
            uncond: The unconditional condition (e.g. the null condition), needed when ``guidance_scale != 1``.
            x_T: Starting noise of shape ``shape`` (drawn when ``None``).
            clip_x0: Clamp the predicted x0 to ``[-clip_x0, clip_x0]`` (DDIM only).
            return_intermediates: Also return ``{"x_inter": [...], "pred_x0": [...]}`` (DDIM only).
            progress: Show a tqdm progress bar of the sampling steps (on global rank zero only; off by default and
                in the package's callbacks). Off, the loop is the same as without the option.
            precision: ``None``: the attached Trainer's precision (float32 without one); ``"32-true"``,
                ``"bf16-mixed"`` or ``"16-mixed"`` (or Lightning's short names ``32``, ``"16"``, ``"bf16"``): that
                one (autocast on the module's device, as Lightning's plugin), whether a Trainer is attached or not.

        Returns:
            Samples (in ``x_T``'s dtype), or ``(samples, intermediates)``.

        Raises:
            TypeError: A bad ``shape`` entry, or a ``sampler`` that is neither ``"ddim"`` nor a scheduler.
            ValueError: A bad ``shape`` or ``x_T``, guidance without ``uncond``/``cond``, a DDIM-only option with a
                scheduler, a scheduler whose ``ā``, T or ``prediction_type`` differs from the schedule's, more steps
                than the sampler supports, or an argument rejected by the sampler.
        """
        shape = check_shape("shape", shape)
        progress = check_bool("progress", progress)
        precision_context = self._precision_context(precision)  # checks precision
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected shape {shape}")
        schedule = self._require_schedule()
        ddim = check_sampler(sampler)
        if not ddim:
            check_scheduler(sampler, schedule)
            if return_intermediates or clip_x0 is not None:
                raise ValueError(
                    "return_intermediates and clip_x0 are options of sampler='ddim'; a scheduler "
                    f"({type(sampler).__name__}) takes neither"
                )
        model_fn = guided_condition(
            lambda x, t, cond=None: self.apply_model(x, t, cond),
            shape[0],
            guidance_scale,
            cond,
            uncond,
        )
        device = self._schedule_device
        with contextlib.ExitStack() as stack:
            if progress and getattr(self, "global_rank", 0) == 0:
                model_fn = stack.enter_context(_progress_bar(model_fn, sampler, method, num_steps, schedule))
            stack.enter_context(eval_mode(self))
            stack.enter_context(precision_context)
            if x_T is None:
                draw_device = generator.device if generator is not None else device
                x_T = torch.randn(shape, device=draw_device, dtype=torch.float32, generator=generator)
                x_T = x_T.to(device=device, dtype=torch.get_default_dtype())
            else:
                x_T = x_T.to(device)
            if not ddim:
                return scheduler_loop(model_fn, x_T, sampler, num_steps, eta, generator)
            run: Any = ddim_sample  # one call for both overloads
            return run(
                model_fn,
                x_T,
                schedule.table("alphas_cumprod", device),
                num_steps=num_steps,
                method=method,
                eta=eta,
                parameterization=schedule.parameterization,
                generator=generator,
                clip_x0=clip_x0,
                return_intermediates=return_intermediates,
            )

    # -------------------------------------------------------------------------------------------- Lightning hooks
    @override
    def on_fit_start(self) -> None:
        """Clear ``last_timestep_losses`` (a second fit starts without the first one's record), then ``super()``.

        Also warns when a weight-averaging callback (``EMAWeightAveraging``) will not update before
        ``trainer.max_steps``: at the end of the fit Lightning copies its average, still the initial weights, into
        the module.
        """
        self.last_timestep_losses = None
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            _warn_if_averaging_never_updates(trainer, type(self).__name__)
        super().on_fit_start()

    @override
    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        """Sample for ``trainer.predict(model, dataloaders)``: each batch says what to sample.

        A predict batch is one of

        * a Tensor: the starting noise ``x_T`` (its shape is the samples' shape);
        * a pair ``(x_T, cond)`` (or ``(x_T,)``), as a ``DataLoader`` over a ``TensorDataset(noise, labels)`` yields;
        * a mapping of :meth:`sample`'s keyword arguments, with ``"shape"`` or ``"x_T"`` (``"cond"``, ``"uncond"``,
          ``"num_steps"``, ``"sampler"``, ``"guidance_scale"``, ``"generator"``, ...), e.g. from
          ``DataLoader([{"shape": (16, 4, 32, 32), "num_steps": 100}], batch_size=None)`` (no collation).

        Returns:
            What :meth:`sample` returns for these arguments (for a latent module: the decoded images).

        Raises:
            TypeError: The batch is none of these.
            ValueError: A mapping has keys that :meth:`sample` does not take, or neither ``"shape"`` nor ``"x_T"``.
        """
        return self.sample(**_predict_arguments(batch, type(self).sample))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the schedule fingerprint under ``checkpoint["lightning_ldm"]["schedule"]``, then call ``super()``."""
        if self.noise_schedule is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["schedule"] = self.noise_schedule.fingerprint
        super().on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose schedule fingerprint differs from the registered one, then call ``super()``.

        A checkpoint without a fingerprint loads with a warning; if no schedule is registered yet, the comparison
        happens at the next :meth:`register_schedule`. ``check_schedule_on_load = False`` skips it.

        Raises:
            ValueError: The schedules differ; the message lists each differing key with both values.
        """
        if self.check_schedule_on_load:
            entry = checkpoint.get(CHECKPOINT_KEY)
            saved = entry.get("schedule") if isinstance(entry, Mapping) else None
            if saved is None:
                rank_zero_warn(
                    f"The checkpoint has no lightning_ldm schedule fingerprint, so {type(self).__name__} cannot check "
                    "that it was trained with the same noise schedule; loading it as it is.",
                    category=UserWarning,
                )
            elif self.noise_schedule is None:
                self._pending_schedule_fingerprint = dict(saved)
            else:
                self._raise_on_mismatch(saved, self.noise_schedule.fingerprint)
        super().on_load_checkpoint(checkpoint)

    def _raise_on_mismatch(self, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        diff = fingerprint_difference(saved, current)
        if diff:
            lines = "; ".join(f"{key}: checkpoint {a!r}, model {b!r}" for key, (a, b) in diff.items())
            raise ValueError(
                f"The checkpoint was trained with a different noise schedule than {type(self).__name__} registered "
                f"({lines}). Register the checkpoint's schedule, or set `check_schedule_on_load = False` on the "
                "model to load it anyway."
            )


@contextlib.contextmanager
def _progress_bar(
    model_fn: Callable[..., Tensor], sampler: Any, method: str, num_steps: int, schedule: NoiseSchedule
) -> Iterator[Callable[..., Tensor]]:
    """``model_fn`` wrapped to advance a tqdm bar by one step per call (the samplers call it once per step).

    The total is the number of DDIM steps, or the length of the scheduler's ``timesteps`` once its loop has set them.
    Wrapping the model function keeps the samplers' loops untouched: with ``progress=False`` nothing is wrapped.
    """
    from tqdm.auto import tqdm

    total: int | None = None
    if isinstance(sampler, str):
        with contextlib.suppress(ValueError, TypeError):  # bad options: ddim_sample raises the named error itself
            total = len(make_ddim_timesteps(method, num_steps, schedule.num_timesteps, verbose=False))
    bar = tqdm(total=total, desc="Sampling", unit="step", leave=False, dynamic_ncols=True)

    def stepped(*args: Any, **kwargs: Any) -> Tensor:
        if bar.total is None and not isinstance(sampler, str):
            bar.total = len(getattr(sampler, "timesteps", ())) or None
            bar.refresh()
        out = model_fn(*args, **kwargs)
        bar.update(1)
        return out

    try:
        yield stepped
    finally:
        bar.close()


def _predict_arguments(batch: Any, sample: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments of ``sample`` that a predict batch stands for (see ``DiffusionMixin.predict_step``)."""
    if isinstance(batch, Tensor):
        return {"shape": tuple(batch.shape), "x_T": batch}
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2) and isinstance(batch[0], Tensor):
        cond = batch[1] if len(batch) == 2 else None
        return {"shape": tuple(batch[0].shape), "x_T": batch[0], "cond": cond}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"a predict batch must be a Tensor (the starting noise x_T), a pair (x_T, cond) or a mapping of sample() "
            f"keyword arguments, got {type(batch).__name__}"
        )
    params = inspect.signature(sample).parameters
    known = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # a subclass forwarding **options to the mixin's
        known |= set(inspect.signature(DiffusionMixin.sample).parameters)
    known.discard("self")
    unknown = sorted(str(k) for k in batch if k not in known)
    if unknown:
        raise ValueError(
            f"the predict batch has key(s) {unknown} that sample() does not take; expected some of {sorted(known)}"
        )
    arguments = dict(batch)
    if "shape" not in arguments:
        x_T = arguments.get("x_T")
        if not isinstance(x_T, Tensor):
            raise ValueError(f"the predict batch needs 'shape' or a Tensor 'x_T', got keys {sorted(map(str, batch))}")
        arguments["shape"] = tuple(x_T.shape)
    return arguments


def _warn_if_averaging_never_updates(trainer: Any, module: str) -> None:
    """Warn for each ``EMAWeightAveraging``-like callback whose first step update comes at or after ``max_steps``.

    Lightning's ``EMAWeightAveraging.should_update(step_idx)`` updates after optimizer step ``step_idx`` (0-based)
    when ``step_idx >= update_starting_at_step`` and ``step_idx % update_every_n_steps == 0``; a fit of ``max_steps``
    steps sees ``step_idx`` in ``[0, max_steps)``. Callbacks that may update per epoch, or lack these attributes,
    and fits without ``max_steps`` are left alone.
    """
    from lightning.pytorch.callbacks import WeightAveraging

    max_steps = getattr(trainer, "max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 0:
        return
    for callback in getattr(trainer, "callbacks", []):
        every = getattr(callback, "update_every_n_steps", None)
        start = getattr(callback, "update_starting_at_step", None)
        if (
            not isinstance(callback, WeightAveraging)
            or not isinstance(every, int)
            or getattr(callback, "update_starting_at_epoch", None) is not None
        ):
            continue
        start = start if isinstance(start, int) and start > 0 else 0
        first = None if every <= 0 else -(-start // every) * every  # the first multiple of `every` at or after start
        if first is not None and first < max_steps:
            continue
        when = "never updates by step" if first is None else f"first updates after optimizer step {first + 1}"
        rank_zero_warn(
            f"{type(callback).__name__}(update_starting_at_step={callback.update_starting_at_step}, "  # type: ignore[attr-defined]
            f"update_every_n_steps={every}) {when}, but the fit ends at max_steps={max_steps}: at the end of the fit "
            f"Lightning copies its never-updated average (the initial weights) into {module}. Lower "
            "update_starting_at_step, or raise max_steps.",
            category=UserWarning,
        )
