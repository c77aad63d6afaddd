r"""The frozen first stage of a latent diffusion model: encode images to scaled latents and decode them back.

:class:`FirstStage` wraps an autoencoder (diffusers' ``AutoencoderKL`` or a CompVis-style ``AutoencoderKL`` /
``VQModelInterface``) and keeps it frozen: no gradients, eval mode through ``model.train()``. The latents the
diffusion model sees are

.. math::

    z = (\mathrm{enc}(x) - \mathrm{shift}) \cdot \mathrm{scale}, \qquad \hat x = \mathrm{dec}(z / \mathrm{scale} +
    \mathrm{shift})

as diffusers writes it (CompVis has no shift: ``scale · z`` and ``dec(1/scale · z)``). The scale is fixed, or, with
``scale_by_std=True``, fitted once by :meth:`FirstStage.fit_scale` to ``1/std`` of the first training batch's latents
(CompVis' ``scale_by_std``) and then kept in the checkpoint, so that a resumed run restores it instead of fitting
again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.amp.autocast_mode import is_autocast_available
from torch.distributions import Distribution, Independent, Normal

from lightning_ldm._checks import check_bool, check_instance, check_int, check_real, describe

__all__ = ["FirstStage"]

log = logging.getLogger(__name__)


def _config_value(autoencoder: nn.Module, name: str) -> Any:
    """``autoencoder.config.<name>`` (diffusers' ``ConfigMixin``) or ``None`` when absent."""
    config = getattr(autoencoder, "config", None)
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _first_output(output: Any, attribute: str) -> Any:
    """Unwrap a diffusers output (``output.<attribute>``) or a tuple (its first element: CompVis' VQ ``encode``)."""
    if hasattr(output, attribute):
        return getattr(output, attribute)
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


@contextlib.contextmanager
def _autocast_disabled(device_type: str) -> Iterator[None]:
    """Switch autocast off for ``device_type`` (a no-op where the device type has no autocast)."""
    context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if is_autocast_available(device_type):
        context = torch.autocast(device_type=device_type, enabled=False)
    with context:
        yield


def _takes_generator(method: Callable[..., Any]) -> bool:
    try:
        return "generator" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _moments(posterior: Any) -> tuple[Any, Any]:
    """``(mean, std)`` of a posterior that is sampled here as ``mean + std·ε`` (``None`` where it has none).

    Duck-typed ``mean``/``std`` (CompVis' and diffusers' ``DiagonalGaussianDistribution``), or a
    ``torch.distributions.Normal`` (possibly inside ``Independent``), whose std is ``stddev``. Any other
    ``torch.distributions`` object has no ``std`` here: ``mean + stddev·ε`` would not be a draw from it.
    """
    if isinstance(posterior, Distribution):
        base = posterior
        while isinstance(base, Independent):
            base = base.base_dist
        try:
            mean = posterior.mean
        except NotImplementedError:
            return None, None
        return mean, (posterior.stddev if isinstance(base, Normal) else None)
    return getattr(posterior, "mean", None), getattr(posterior, "std", None)


def _draw_latents(posteriors: list[Any], generator: torch.Generator | None, sample_posterior: bool) -> Tensor:
    """Latents (float32 or the encoder's dtype) from the per-micro-batch encoder outputs.

    A Gaussian posterior (``mean`` and ``std``, or a ``torch.distributions.Normal``) is sampled here as
    ``mean + std·ε`` with one float32 ``ε`` drawn for the whole batch from ``generator`` (on the generator's device),
    so micro-batching does not change the draw. Another ``torch.distributions`` object cannot draw from
    ``generator``: it is refused when one is given.
    """
    first = posteriors[0]
    if isinstance(first, Tensor):
        return torch.cat(posteriors)
    mean, std = _moments(first)
    if isinstance(mean, Tensor) and (not sample_posterior or isinstance(std, Tensor)):
        moments = [_moments(p) for p in posteriors]
        means = torch.cat([m for m, _ in moments])
        if not sample_posterior:
            return means
        stds = torch.cat([s for _, s in moments])
        draw_device = generator.device if generator is not None else means.device
        noise = torch.randn(means.shape, generator=generator, device=draw_device, dtype=torch.float32)
        return means.float() + stds.float() * noise.to(means.device)
    if isinstance(first, Distribution) and sample_posterior and generator is not None:
        raise TypeError(
            f"the autoencoder's encode returned a torch.distributions.{type(first).__name__}, which cannot draw "
            "from the given generator (its .sample() would use the global RNG); FirstStage draws mean + std·ε from "
            "the generator for a Normal (or Independent Normal) or an object with mean/std tensors: return one of "
            "those, or encode with sample_posterior=False"
        )
    name = "sample" if sample_posterior else "mode"
    method = getattr(first, name, None)
    if not callable(method):
        raise TypeError(
            f"the autoencoder's encode returned {type(first).__name__}, which is neither a Tensor nor a distribution "
            f"with mean/std or a .{name}() method; expected a Tensor, a diffusers AutoencoderKLOutput or a "
            "CompVis DiagonalGaussianDistribution"
        )
    if name == "sample" and generator is not None and _takes_generator(method):
        return torch.cat([p.sample(generator=generator) for p in posteriors])
    return torch.cat([getattr(p, name)() for p in posteriors])


def _reduce(values: list[float | Tensor], device: torch.device, group: Any) -> list[float]:
    """Sum float64 statistics over the ranks of ``group`` (when torch.distributed is initialised)."""
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(device) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return [float(v) for v in stats.tolist()]


def _reduce_device(latents: Tensor, group: Any) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pooled_std(latents: Tensor, shift: float, group: Any) -> float:
    """Unbiased standard deviation of all elements of ``latents − shift`` pooled over the ranks (two float64 passes)."""
    z = latents.detach()
    z = (z.cpu() if z.device.type == "mps" else z).double() - shift
    device = _reduce_device(latents, group)
    count, total, bad = _reduce([float(z.numel()), z.sum(), (~torch.isfinite(z)).sum()], device, group)
    if bad:
        raise ValueError(f"fit_scale: the latents hold {int(bad)} non-finite values (over all ranks)")
    if count < 2:
        raise ValueError(f"fit_scale needs at least 2 latent values (over all ranks) for a std, got {int(count)}")
    (squares,) = _reduce([(z - total / count).square().sum()], device, group)
    std = math.sqrt(squares / (count - 1))
    if std == 0.0:
        raise ValueError("fit_scale: the latents are constant (std 0), so 1/std is undefined")
    return std


def _finish_state_dict(module: FirstStage, state_dict: dict[str, Any], prefix: str) -> None:
    """Store the factor in use (float32) and leave the autoencoder out when asked."""
    module.store_scale(state_dict, prefix)
    if not module.keep_weights_in_checkpoint:
        for key in [k for k in state_dict if k.startswith(prefix + "autoencoder.")]:
            del state_dict[key]


def _check_stored_scale(module: FirstStage, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Refuse a corrupt stored scale factor, then restore (``scale_by_std``) or check (fixed factor) it."""
    module._load_prefix = prefix
    stored = state_dict.get(prefix + "scale_factor")
    if stored is None:
        return
    name = f"the checkpoint's {prefix}scale_factor"
    stored = torch.as_tensor(stored)
    if stored.numel() != 1:
        raise ValueError(f"{name} must hold one number, got {describe(stored)}")
    # what the constructor accepts, and nothing else: a NaN, 0, negative or infinite factor is a corrupt checkpoint
    value = check_real(name, float(stored.float()), minimum=0.0, min_inclusive=False)
    if module.scale_by_std:
        fitted = state_dict.get(prefix + "scale_fitted")
        module._set_scale(value, fitted=True if fitted is None else bool(torch.as_tensor(fitted)))
    elif not math.isclose(value, module.scale, rel_tol=1e-6):
        raise ValueError(
            f"the checkpoint's {prefix}scale_factor={value!r} differs from the fixed scale_factor={module.scale!r} "
            "of this model; pass scale_factor equal to the stored value, or scale_by_std=True to restore it"
        )


def _load_post_hook(module: FirstStage, incompatible: Any) -> None:
    """Accept missing autoencoder weights (``keep_weights_in_checkpoint=False``) and a missing fitted flag."""
    prefix = getattr(module, "_load_prefix", None)
    if prefix is None:
        return
    accepted = (prefix + "autoencoder.",) if not module.keep_weights_in_checkpoint else ()
    accepted += (prefix + "scale_fitted",)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(accepted)]
    module._load_prefix = None


class FirstStage(nn.Module):
    """A frozen autoencoder with scaled, micro-batched ``encode``/``decode``.

    Args:
        autoencoder: An ``nn.Module`` with callable ``encode`` and ``decode``. ``encode`` may return a diffusers
            output (``.latent_dist``), a distribution (``mean``/``std``, a ``torch.distributions.Normal``, or
            ``.sample()``/``.mode()``), a tuple (its first element is used) or a Tensor; ``decode`` a diffusers output
            (``.sample``), a tuple or a Tensor.
        scale_factor: Latent scale. ``None`` takes the autoencoder's ``config.scaling_factor`` when it has one, else
            ``1.0``. With ``scale_by_std`` it is the value used until :meth:`fit_scale` runs.
        shift_factor: Latent shift, subtracted before scaling. ``None`` takes ``config.shift_factor`` (``None`` there
            counts as ``0.0``).
        scale_by_std: Fit the scale to ``1/std`` of the first training batch's latents (see :meth:`fit_scale`) and
            restore it from checkpoints. Without it, loading a checkpoint whose stored factor differs is refused.
        micro_batch_size: Run the autoencoder on at most this many samples at a time; ``None`` runs the whole batch.
        autocast: ``True`` runs the autoencoder under whatever autocast is active (the Trainer's precision).
            ``False`` switches autocast off for the input's device type and feeds the input in the autoencoder's
            parameter dtype (float32 unless the module was cast), as Stability's ``disable_first_stage_autocast``.
        keep_weights_in_checkpoint: ``False`` leaves the autoencoder's weights out of ``state_dict()`` and accepts
            their absence on load (the scale factor is always kept).

    Loading a state dict whose ``scale_factor`` the constructor would refuse (NaN, infinite, zero or negative: a
    corrupt checkpoint) raises the constructor's ``ValueError``, naming the checkpoint's key.

    Attributes:
        scale_factor: Float32 0-d buffer: the checkpoint record of the factor in use (:attr:`scale`).
        scale_fitted: Bool 0-d buffer: whether :meth:`fit_scale` has run (or a fitted factor was loaded).

    Raises:
        TypeError: ``autoencoder`` is not an ``nn.Module`` or lacks a callable ``encode``/``decode``; a number or flag
            has the wrong type.
        ValueError: ``scale_factor`` is not finite and positive, ``shift_factor`` is not finite, or
            ``micro_batch_size < 1``.
    """

    scale_factor: Tensor
    scale_fitted: Tensor

    def __init__(
        self,
        autoencoder: nn.Module,
        *,
        scale_factor: float | None = None,
        shift_factor: float | None = None,
        scale_by_std: bool = False,
        micro_batch_size: int | None = None,
        autocast: bool = True,
        keep_weights_in_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        check_instance("autoencoder", autoencoder, nn.Module, "an nn.Module with encode/decode")
        for method in ("encode", "decode"):
            if not callable(getattr(autoencoder, method, None)):
                raise TypeError(
                    f"autoencoder {type(autoencoder).__name__} has no callable `{method}`; a first stage needs "
                    "encode(x) and decode(z)"
                )
        scale_by_std = check_bool("scale_by_std", scale_by_std)
        autocast = check_bool("autocast", autocast)
        keep_weights_in_checkpoint = check_bool("keep_weights_in_checkpoint", keep_weights_in_checkpoint)
        if scale_factor is None:
            scale_factor = _config_value(autoencoder, "scaling_factor")
        scale = check_real(
            "scale_factor", 1.0 if scale_factor is None else scale_factor, minimum=0.0, min_inclusive=False
        )
        if shift_factor is None:
            shift_factor = _config_value(autoencoder, "shift_factor")
        self.shift = check_real("shift_factor", 0.0 if shift_factor is None else shift_factor)
        self.micro_batch_size = (
            None if micro_batch_size is None else check_int("micro_batch_size", micro_batch_size, minimum=1)
        )
        self.scale_by_std = scale_by_std
        self.autocast = autocast
        self.keep_weights_in_checkpoint = keep_weights_in_checkpoint
        # never chain on what eval()/train() return: CompVis replaces a frozen stage's `train` by `disabled_train`,
        # so its `.eval()` returns whatever that function returns (False), not the module
        autoencoder.eval()
        autoencoder.requires_grad_(False)
        self.autoencoder = autoencoder
        self.register_buffer("scale_factor", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("scale_fitted", torch.tensor(False))
        self._scale = scale
        self._fitted = False
        self._load_prefix: str | None = None
        self.register_load_state_dict_post_hook(_load_post_hook)

    @property
    def scale(self) -> float:
        """The scale factor in use (a Python float: no host sync, untouched by dtype casts and weight averaging)."""
        return self._scale

    @property
    def is_scale_fitted(self) -> bool:
        """Whether :meth:`fit_scale` has run, or a fitted factor was loaded."""
        return self._fitted

    @property
    def needs_scale_fit(self) -> bool:
        """``scale_by_std`` and no factor fitted or restored yet: call :meth:`fit_scale` on this training batch."""
        return self.scale_by_std and not self._fitted

    def _set_scale(self, value: float, *, fitted: bool) -> None:
        self._scale, self._fitted = value, fitted
        with torch.no_grad():
            self.scale_factor.fill_(value)
            self.scale_fitted.fill_(fitted)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The state dict with the factor in use, without the autoencoder's weights if it is not kept."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        _finish_state_dict(self, out, prefix)
        return out

    def store_scale(self, state_dict: MutableMapping[str, Any], prefix: str = "") -> None:
        """Write the factor in use (float32) and the fitted flag into ``state_dict`` under ``prefix``.

        :meth:`state_dict` calls it. Call it yourself where a checkpoint's state dict was taken from *another copy*
        of this module: Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) saves its averaged copy, made before
        :meth:`fit_scale` ran, whose factor was never fitted. ``LatentDiffusionMixin.on_save_checkpoint`` does it for
        every first stage of the module.

        Args:
            state_dict: The state dict to update (entries already there keep their device).
            prefix: This module's key prefix in ``state_dict`` (``"first_stage."``).
        """
        stored = state_dict.get(prefix + "scale_factor")
        device = stored.device if isinstance(stored, Tensor) else self.scale_factor.device
        state_dict[prefix + "scale_factor"] = torch.tensor(self._scale, dtype=torch.float32, device=device)
        state_dict[prefix + "scale_fitted"] = torch.tensor(self._fitted, device=device)

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
        _check_stored_scale(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def train(self, mode: bool = True) -> FirstStage:
        """Set the training flag of this wrapper; the autoencoder stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def scale_latents(self, z: Tensor) -> Tensor:
        """``(z − shift)·scale`` in float32 (no shift subtraction when the shift is 0)."""
        z = z.float()
        return ((z - self.shift) if self.shift else z) * self._scale

    def unscale_latents(self, z: Tensor) -> Tensor:
        """``z/scale + shift`` in float32, the inverse of :meth:`scale_latents`."""
        z = z.float() / self._scale
        return (z + self.shift) if self.shift else z

    @staticmethod
    def _check_batch(x: Any) -> None:
        """The public entries' one check of their input (``_run`` takes it unchecked)."""
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the first stage needs a Tensor with a non-empty batch dimension, got {shape}")

    def _chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) if self.micro_batch_size is None else x.split(self.micro_batch_size)

    def _run(self, name: str, unwrap: str, x: Tensor) -> list[Any]:
        """Call ``autoencoder.<name>`` per micro-batch without gradients and unwrap each output (``x`` is checked)."""
        if self.autoencoder.training:  # frozen: eval mode whatever set the flag (see LatentDiffusionMixin.on_fit_start)
            nn.Module.train(self.autoencoder, False)  # not its own train(): CompVis disables that
        method: Callable[[Tensor], Any] = getattr(self.autoencoder, name)
        chunks = self._chunks(x)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if not self.autocast:
                stack.enter_context(_autocast_disabled(x.device.type))
                dtype = next((p.dtype for p in self.autoencoder.parameters() if p.is_floating_point()), torch.float32)
                chunks = tuple(c.to(dtype) for c in chunks)
            return [_first_output(method(c), unwrap) for c in chunks]

    def encode(
        self,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        scaled: bool = True,
    ) -> Tensor:
        """Encode ``x`` to latents without gradients.

        Args:
            x: Images ``(B, C, H, W)`` (or any layout the autoencoder takes), batch first.
            generator: Generator for the posterior sample (on its own device; ``None``: the global RNG).
            sample_posterior: Draw from the posterior (``mean + std·ε`` with ``ε`` from ``generator`` for a Gaussian:
                ``mean``/``std``, or a ``torch.distributions.Normal``; else ``.sample()``); ``False`` takes its mode
                (the mean of a Gaussian).
            scaled: Return :meth:`scale_latents` of the latents; ``False`` returns them as the autoencoder gives them
                (what :meth:`fit_scale` takes).

        Returns:
            Latents in ``x``'s dtype (float32 for integer ``x``), computed in float32.

        Raises:
            ValueError: ``x`` is not a Tensor with a non-empty batch dimension.
            TypeError: The autoencoder's output is neither a Tensor nor a distribution, or is a non-Gaussian
                ``torch.distributions`` object while a ``generator`` is given (it cannot draw from it).
        """
        self._check_batch(x)
        outputs = self._run("encode", "latent_dist", x)
        with torch.no_grad():
            z = _draw_latents(outputs, generator, sample_posterior)
            z = self.scale_latents(z) if scaled else z.float()
        return z.to(x.dtype if x.is_floating_point() else torch.float32)

    def decode(self, z: Tensor, *, scaled: bool = True) -> Tensor:
        """Decode latents without gradients.

        Args:
            z: Latents ``(B, ...)``.
            scaled: ``z`` is scaled (the diffusion model's latents): :meth:`unscale_latents` is applied first.

        Returns:
            The decoded samples in ``z``'s dtype.

        Raises:
            ValueError: ``z`` is not a Tensor with a non-empty batch dimension.
        """
        self._check_batch(z)
        z_in = self.unscale_latents(z).to(z.dtype) if scaled else z
        outputs = self._run("decode", "sample", z_in)
        return torch.cat(outputs).to(z.dtype)

    def fit_scale(self, latents: Tensor, *, group: Any = None) -> float:
        """Set the scale to ``1/std`` of the shifted latents (``scale_by_std``), pooled over the ranks.

        The std is the unbiased (Bessel-corrected) standard deviation of every element of ``latents − shift`` on
        every rank of ``group`` taken together, as if the ranks' batches were concatenated: counts, sums and sums of
        squared deviations are all-reduced in float64 (two passes). On one process this is CompVis'
        ``1 / z.flatten().std()`` (computed in float64, then rounded to float32 as the checkpoint stores it). Every
        rank of ``group`` must call it.

        Args:
            latents: Unscaled latents (``encode(x, scaled=False)``) of this rank's first training batch.
            group: The process group (``None``: the default group).

        Returns:
            The fitted factor.

        Raises:
            ValueError: ``scale_by_std`` is ``False``; the latents are not a floating Tensor, hold non-finite values
                (on any rank), fewer than 2 values or are constant.
        """
        if not self.scale_by_std:
            raise ValueError(f"fit_scale needs scale_by_std=True; the scale_factor={self.scale!r} is fixed")
        if not isinstance(latents, Tensor) or not latents.is_floating_point():
            described = f"{latents.dtype} Tensor" if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"fit_scale needs floating latents, got a {described}")
        std = _pooled_std(latents, self.shift, group)
        # rounded to float32, the precision the checkpoint stores, so a resumed run uses the very same factor
        self._set_scale(float(torch.tensor(1.0 / std, dtype=torch.float32)), fitted=True)
        log.info("first stage: scale_factor fitted to 1/std = %.8g", self._scale)
        return self._scale

    def extra_repr(self) -> str:
        """Scale, shift and options."""
        return (
            f"scale_factor={self.scale:.6g}, shift_factor={self.shift:.6g}, scale_by_std={self.scale_by_std}, "
            f"micro_batch_size={self.micro_batch_size}, autocast={self.autocast}"
        )
