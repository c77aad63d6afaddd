r"""``SampleQualityMonitor``: FID and KID of samples from fixed noise against real images, during training.

Every ``every_n_steps`` optimizer steps and/or at the end of every validation pass, the module is sampled from fixed
starting noise exactly as :class:`~lightning_ldm.callbacks.SampleLogger` samples it (its ``sample``: DDIM, guidance,
first-stage decoding; the averaged weights of an ``EMAWeightAveraging`` callback when they exist), the samples are
mapped to feature vectors by a feature extractor (any ``nn.Module`` from images to vectors), and torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` compare them with the features of a reference set of real
images, computed once per fit and cached (:func:`fid_and_kid` is the same comparison as a function). The values
are written to the Trainer's loggers as ``quality/fid``, ``quality/kid_mean`` and ``quality/kid_std`` and put in
``trainer.callback_metrics``, so that ``ModelCheckpoint(monitor="quality/fid", mode="min")`` and ``EarlyStopping`` can
use them.

The maths is torchmetrics': this module only extracts, gathers and caches features, and feeds them to the two
metrics through an identity extractor. torchmetrics (1.3.1 to 1.9) has no precision/recall of generative models, so
none is logged.

Under DDP every rank samples its contiguous share of the noise and extracts the features of its share of the
reference; the features are gathered in order, so the metrics see the same ``M`` samples and ``N`` reference images
whatever the world size, and every rank computes the same values.

**Samples.** ``shape[0] = M`` samples are drawn from fixed starting noise, the same at every evaluation
(``SampleLogger``'s noise for the same ``shape`` and ``seed``), with the arguments of ``SampleLogger`` (DDIM steps,
η, guidance, conditioning, diffusers scheduler) and through its :meth:`SampleLogger.sample`, in batches of
``batch_size`` per rank. With an averaging callback (``EMAWeightAveraging``) the averaged weights are used once
they exist; the training weights, the modules' modes and every random stream of training are left as they were
(a fit with and without this callback ends with the same weights). Conditioning is cut with the noise: every
tensor in ``cond``/``uncond`` whose first axis has length ``M`` is split into the same batches; other values are
passed whole. With ``eta > 0`` the η noise is drawn per batch, so samples then depend on ``batch_size`` and the
world size; with ``eta = 0`` (the default) they do not.

**Features.** ``features`` maps a batch of images (as :meth:`sample` returns them, float32, and the reference
images, both in the same value range) to vectors ``(B, D)``; ``None`` takes
:class:`~lightning_ldm.features.RandomConvFeatures` of the reference's channel count, which works offline; read its
caveat (a FID on random features is comparable only to another on the same features: set a real-vs-real floor
beside it). :class:`~lightning_ldm.features.InceptionFeatures` gives published-style FIDs when torch-fidelity and
its weights are available; the penultimate layer of a classifier of your data is the most telling choice.

**Reference.** ``reference``: real images ``(N, C, H, W)`` (e.g. the validation images), or ``None`` with
:meth:`reference_images` overridden (e.g. to read them from ``trainer.datamodule``). Their features are computed at
the start of each fit (``on_train_start``, so after a resume too: never stale) and cached. The checkpoint
keeps a fingerprint of them; a resume whose recomputed reference features differ warns
that FIDs before and after the resume are not comparable.

**Cost.** About ``M × num_steps`` denoiser forwards (twice with guidance) shared over the ranks, plus the
features and the metrics; ``docs/benchmarks.md`` measures it in training steps. Choose ``every_n_steps``
accordingly.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from typing_extensions import override

from lightning_ldm._checks import check_floating, check_instance, check_int, check_str
from lightning_ldm.callbacks._base import PeriodicCallback
from lightning_ldm.callbacks._diffusion import gather_rows
from lightning_ldm.callbacks._sampling import floating_dtype, sampling_weights, training_streams_kept
from lightning_ldm.callbacks.sample_logger import BATCH_PREFIX, CALL_PREFIX, SampleLogger, _pending
from lightning_ldm.features import RandomConvFeatures
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.seeding import derive_seed

__all__ = ["SampleQualityMonitor", "fid_and_kid"]

log = logging.getLogger(__name__)

#: torchmetrics' default KID subset size; smaller when there are fewer samples or reference images.
_KID_SUBSET_SIZE = 1000
#: Relative tolerance of the reference fingerprint comparison after a resume (recomputed features may differ in the
#: last bits on another device or thread count).
_FINGERPRINT_RTOL = 1e-4


class _Given(nn.Module):
    """The identity, posing as a feature extractor of ``num_features`` features: torchmetrics gets our features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``total`` rows, cut as ``torch.tensor_split`` cuts."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _rows(value: Any, start: int, stop: int, total: int) -> Any:
    """``value`` with each tensor of first axis ``total`` (in mappings, lists, tuples) cut to rows ``[start, stop)``."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.ndim > 0 and value.shape[0] == total else value
    if isinstance(value, Mapping):
        return {k: _rows(v, start, stop, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, start, stop, total) for v in value)
    return value


def _kid_subset_size(size: int | None, samples: int, references: int) -> int:
    """``size`` (``None``: ``min(1000, samples, references)``) after checking it fits both sets."""
    largest = min(samples, references)
    subset = min(_KID_SUBSET_SIZE, largest) if size is None else check_int("kid_subset_size", size, minimum=2)
    if subset > largest:
        raise ValueError(
            f"kid_subset_size={subset} exceeds the {samples} samples or the {references} reference images; "
            f"expected at most {largest}"
        )
    return subset


def _default_extractor(images: Tensor) -> nn.Module:
    """``RandomConvFeatures`` of the reference images' channels (images ``(N, C, H, W)`` only)."""
    if images.ndim != 4:
        raise ValueError(
            f"the default feature extractor takes images (N, C, H, W), got reference shape {tuple(images.shape)}; "
            "pass features=<an nn.Module mapping your samples to vectors>"
        )
    return RandomConvFeatures(int(images.shape[1]))


def _batches(start: int, stop: int, size: int | None) -> list[tuple[int, int]]:
    """``[a, b)`` batches of at most ``size`` rows (``None``: one batch) covering ``[start, stop)``."""
    size = size or max(stop - start, 1)
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def _extract(extractor: nn.Module, batches: list[Tensor], device: torch.device) -> Tensor:
    """Features ``(B, D)`` of the batches (float32 input on ``device``, no gradients)."""
    with torch.no_grad():
        features = torch.cat([extractor(batch.to(device=device, dtype=torch.float32)).float() for batch in batches])
    if features.ndim != 2:
        raise ValueError(f"the feature extractor must return vectors (B, D), got shape {tuple(features.shape)}")
    return features


def _check_same_image_shape(samples: tuple[int, ...], reference: tuple[int, ...], verb: str) -> None:
    """Refuse samples and reference images of different shapes (FID compares like with like)."""
    if tuple(samples) != tuple(reference):
        raise ValueError(
            f"SampleQualityMonitor: the samples {verb} shape {tuple(samples)} each and the reference images "
            f"{tuple(reference)}; FID compares images of one shape: pass reference images shaped like the samples "
            "(decoded images for a latent model), or override sample() to resize the samples"
        )


def _fingerprint(features: Tensor) -> dict[str, float | int]:
    """A small summary of the reference features (count, dimension, norm of the mean, trace of the covariance)."""
    features = features.double()
    return {
        "count": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "mean_norm": float(features.mean(dim=0).norm()),
        "trace": float(features.var(dim=0).sum()),
    }


def _warn_if_changed(saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Warn when the reference fingerprint of a checkpoint differs from the recomputed one."""
    same = saved.get("count") == now["count"] and saved.get("dim") == now["dim"]
    if same and all(
        math.isclose(float(saved[k]), float(now[k]), rel_tol=_FINGERPRINT_RTOL) for k in ("mean_norm", "trace")
    ):
        return
    rank_zero_warn(
        f"SampleQualityMonitor: the reference features differ from those of the checkpoint ({dict(saved)} then, "
        f"{dict(now)} now): the reference images or the feature extractor changed, so FIDs before and after the "
        "resume are not comparable"
    )


def fid_and_kid(
    real: Tensor,
    fake: Tensor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID between two sets of feature vectors, computed by torchmetrics.

    torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` are fed the features through an
    identity extractor, so the maths is theirs.

    KID's random subsets come from the global generator seeded with ``derive_seed(seed, 2)`` inside
    ``torch.random.fork_rng``: the same subsets at every call, and the caller's RNG untouched.

    Args:
        real: Reference features ``(N, D)``, ``N ≥ 2``.
        fake: Sample features ``(M, D)``, ``M ≥ 2``.
        kid_subsets: Number of KID subsets.
        kid_subset_size: Size of each KID subset (``None``: ``min(1000, M, N)``).
        seed: Seed of KID's subsets.

    Returns:
        ``{"fid", "kid_mean", "kid_std"}`` as floats (computed in the features' dtype, as torchmetrics does).

    Raises:
        TypeError: ``real`` or ``fake`` is not a floating tensor.
        ValueError: They are not ``(count ≥ 2, D)`` with the same ``D``, or ``kid_subset_size`` exceeds a count.
    """
    for name, value in (("real", real), ("fake", fake)):
        check_floating(name, value, min_ndim=2)
        if value.ndim != 2 or value.shape[0] < 2:
            raise ValueError(f"{name} must be feature vectors (count >= 2, D), got shape {tuple(value.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in length: {real.shape[1]} and {fake.shape[1]}")
    kid_subsets = check_int("kid_subsets", kid_subsets, minimum=1)
    subset = _kid_subset_size(kid_subset_size, int(fake.shape[0]), int(real.shape[0]))
    dim = int(real.shape[1])
    fid = FrechetInceptionDistance(feature=_Given(dim), sync_on_compute=False)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": these are the features
        warnings.filterwarnings("ignore", message=r".*Kernel Inception Distance.*")
        kid = KernelInceptionDistance(
            feature=_Given(dim), subsets=kid_subsets, subset_size=subset, sync_on_compute=False
        )
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 2))
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


class SampleQualityMonitor(PeriodicCallback):
    r"""Log FID and KID of samples from fixed noise against real reference images, every N steps and/or at validation.

    Example::

        quality = SampleQualityMonitor((500, 4, 8, 8), reference=held_out_images, every_n_steps=1000,
                                       cond=labels, uncond=null_labels, sample_kwargs={"guidance_scale": 3.0})
        trainer = L.Trainer(callbacks=[EMAWeightAveraging(), quality,
                                       ModelCheckpoint(monitor="quality/fid", mode="min")])

    How the samples are made and split over ranks, what the features are, how the reference is cached and resumed,
    and what an evaluation costs: see the module docstring.

    Customise by overriding :meth:`sample` (how samples are made), :meth:`reference_images` (where the real images
    come from) or :meth:`publish` (where the values go).

    Args:
        shape: Shape of the starting noise, batch first: ``M`` samples (``M ≥ 2`` and at least the world size).
        reference: Real images ``(N, ...)``, ``N ≥ 2`` (``None``: override :meth:`reference_images`).
        every_n_steps: Evaluate after every this many optimizer steps (``None``: not on a step schedule).
        at_validation_end: Evaluate at the end of every validation pass (not the sanity check).
        features: Feature extractor (``None``: ``RandomConvFeatures(reference channels)``).
        batch_size: Samples (and reference images) per batch on each rank (``None``: a rank's whole share at once).
        cond: Conditioning of the ``M`` samples (see above for how it is split).
        uncond: Unconditional conditioning for guidance.
        sample_kwargs: Options of ``sample`` (``sampler``, ``num_steps``, ``method``, ``eta``, ``guidance_scale``,
            ``clip_x0``), as :class:`~lightning_ldm.callbacks.SampleLogger` takes them.
        seed: Seed of the starting noise, the η noise and KID's subsets.
        kid_subsets: Number of random subsets KID averages over.
        kid_subset_size: Size of each KID subset (``None``: ``min(1000, M, N)``).
        prefix: Prefix of the logged names (``"quality/"``: ``quality/fid``, ``quality/kid_mean``, ``quality/kid_std``).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, nothing would ever be evaluated, guidance is asked for without
            ``cond`` and ``uncond``, or ``reference`` is ``None`` without :meth:`reference_images` overridden.
    """

    def __init__(
        self,
        shape: Sequence[int],
        reference: Tensor | None = None,
        every_n_steps: int | None = None,
        at_validation_end: bool = True,
        *,
        features: nn.Module | None = None,
        batch_size: int | None = None,
        cond: Any = None,
        uncond: Any = None,
        sample_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        kid_subsets: int = 100,
        kid_subset_size: int | None = None,
        prefix: str = "quality/",
    ) -> None:
        # SampleLogger validates the sampling arguments and draws the fixed noise; it is never a Trainer callback here
        sampler = SampleLogger(shape, cond=cond, uncond=uncond, sample_kwargs=sample_kwargs, seed=seed)
        self.sample_kwargs = sampler.sample_kwargs
        self.shape = sampler.shape
        self.num_samples = check_int("shape[0]", self.shape[0], minimum=2)
        self.seed = sampler.seed
        self.cond, self.uncond = sampler.cond, sampler.uncond
        for name, value in (("cond", self.cond), ("uncond", self.uncond)):
            spec = _pending(value, BATCH_PREFIX) or _pending(value, CALL_PREFIX)
            if spec:
                raise ValueError(
                    f"SampleQualityMonitor({name}: {spec!r}): the 'batch:' and 'call:' forms are SampleLogger's; pass "
                    "the conditions (tensors or lists of numbers) themselves"
                )
        self._noise = sampler.noise
        if reference is not None:
            check_floating("reference", reference, min_ndim=2)
            check_int("reference.shape[0]", reference.shape[0], minimum=2)
        elif type(self).reference_images is SampleQualityMonitor.reference_images:
            raise ValueError("reference=None needs reference_images overridden; pass the real images as reference")
        self.reference = reference
        super().__init__(every_n_steps, at_validation_end)
        if features is not None:
            what = "an nn.Module mapping images (B, ...) to vectors (B, D), or None"
            check_instance("features", features, nn.Module, what)
        self.features = features
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        self.kid_subsets = check_int("kid_subsets", kid_subsets, minimum=1)
        self.kid_subset_size = (
            None if kid_subset_size is None else check_int("kid_subset_size", kid_subset_size, minimum=2)
        )
        self.prefix = check_str("prefix", prefix)
        #: The values of the last evaluation (``{name: float}``), empty before.
        self.last_metrics: dict[str, float] = {}
        self._last_step: int | None = None
        self._extractor: nn.Module | None = None
        self._real: Tensor | None = None
        self._reference_fingerprint: dict[str, Any] | None = None
        self._saved_fingerprint: dict[str, Any] | None = None
        self._reference_shape: tuple[int, ...] = ()

    @property
    def noise(self) -> Tensor:
        """The fixed starting noise (float32, CPU; a copy)."""
        return self._noise.clone()

    @property
    def names(self) -> tuple[str, str, str]:
        """The logged names: FID, KID mean, KID standard deviation."""
        return f"{self.prefix}fid", f"{self.prefix}kid_mean", f"{self.prefix}kid_std"

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module, the callbacks' order and that the samples can be shared over the ranks; reset.

        The cached reference is forgotten at every stage: it is recomputed at train start or at the first evaluation,
        never stale.

        Raises:
            TypeError: The module does not mix in ``DiffusionMixin``.
            ValueError: Fewer samples than ranks.
        """
        super().setup(trainer, pl_module, stage)
        if self.num_samples < trainer.world_size:
            raise ValueError(
                f"shape[0]={self.num_samples} samples cannot be shared over {trainer.world_size} ranks; expected at "
                f"least one per rank"
            )
        if stage != "fit":
            self.reset()

    @override
    def reset(self) -> None:
        """Forget the cached reference features and the last evaluated step."""
        self._real = self._extractor = None
        self._reference_fingerprint = None
        self._last_step = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute (and cache) the reference features; after a resume, compare them with the checkpoint's."""
        self.reference_features(trainer, pl_module)

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """:meth:`evaluate` (on the step schedule and at validation end)."""
        return self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Sample, extract features, compute FID and KID and publish them, on every rank; once per global step.

        Returns:
            ``{name: value}`` (as :attr:`last_metrics`), or ``None`` when this step is evaluated already.
        """
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        self.reference_features(trainer, pl_module)
        fake = self.sample_features(trainer, pl_module)
        values = self.compute(fake)
        self.last_metrics = values
        self.publish(trainer, values, step)
        return values

    def reference_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """The real images (every rank gets the same ``N`` images; each extracts the features of its share).

        Override to read them from elsewhere (e.g. ``trainer.datamodule``); by default, ``reference``.
        """
        if self.reference is None:  # pragma: no cover - refused in __init__ unless overridden
            raise RuntimeError("SampleQualityMonitor has no reference images")
        return self.reference

    def reference_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """The gathered features ``(N, D)`` of the reference images (CPU), computed once per fit and cached.

        Raises:
            ValueError: The reference has fewer than two images or does not suit the feature extractor, or
                ``kid_subset_size`` exceeds the number of samples or reference images.
        """
        if self._real is not None:
            return self._real
        images = check_floating("reference", self.reference_images(trainer, pl_module), min_ndim=2)
        count = check_int("reference.shape[0]", images.shape[0], minimum=max(2, trainer.world_size))
        if self._extractor is None:
            self._extractor = (self.features if self.features is not None else _default_extractor(images)).eval()
        self._reference_shape = tuple(images.shape[1:])
        if type(self).sample is SampleQualityMonitor.sample and not isinstance(pl_module, LatentDiffusionMixin):
            _check_same_image_shape(self.shape[1:], self._reference_shape, "will have")  # pixel space: shape[1:]
        extractor = self._extractor.to(pl_module.device)
        start, stop = _share(count, trainer.global_rank, trainer.world_size)
        with training_streams_kept(pl_module):
            batches = [images[a:b] for a, b in _batches(start, stop, self.batch_size)]
            own = _extract(extractor, batches, pl_module.device)
        real = gather_rows(trainer, own).cpu()
        _kid_subset_size(self.kid_subset_size, self.num_samples, count)  # refused now rather than at evaluation
        self._real = real
        self._reference_fingerprint = _fingerprint(real)
        saved, self._saved_fingerprint = self._saved_fingerprint, None
        if saved is not None:
            _warn_if_changed(saved, self._reference_fingerprint)
        return real

    def sample_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """Features ``(M, D)`` (CPU, the extractor's dtype) of the ``M`` samples: each rank samples its share.

        The features go to torchmetrics in the dtype the extractor gives (as torchmetrics' own extractor call would),
        gathered over the ranks in order.
        """
        self.reference_features(trainer, pl_module)  # sets the extractor up (cached)
        extractor = self._extractor
        if extractor is None:  # pragma: no cover - set by reference_features
            raise RuntimeError("SampleQualityMonitor has no feature extractor")
        start, stop = _share(self.num_samples, trainer.global_rank, trainer.world_size)
        features = []
        with sampling_weights(trainer, pl_module):
            dtype = floating_dtype(pl_module)
            for a, b in _batches(start, stop, self.batch_size):
                noise = self._noise[a:b].to(device=pl_module.device, dtype=dtype)
                generator = torch.Generator(device=pl_module.device).manual_seed(derive_seed(self.seed, 1, a))
                cond = _rows(self.cond, a, b, self.num_samples)
                uncond = _rows(self.uncond, a, b, self.num_samples)
                samples = self.sample(trainer, pl_module, noise, generator, cond, uncond)
                _check_same_image_shape(tuple(samples.shape[1:]), self._reference_shape, "have")
                features.append(_extract(extractor, [samples], pl_module.device))
        return gather_rows(trainer, torch.cat(features)).cpu()

    def sample(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        noise: Tensor,
        generator: torch.Generator,
        cond: Any,
        uncond: Any,
    ) -> Tensor:
        """Make one batch of samples (images, for the extractor): :meth:`SampleLogger.sample` with these arguments.

        Runs with the module in eval mode, the weights to judge in place and training's RNG kept; ``noise`` and the
        η ``generator`` are on the module's device, ``cond``/``uncond`` are this batch's rows.
        """
        sampler = SampleLogger(noise.shape, cond=cond, uncond=uncond, sample_kwargs=self.sample_kwargs, seed=self.seed)
        return sampler.sample(trainer, pl_module, noise, generator)

    def compute(self, fake: Tensor) -> dict[str, float]:
        """FID and KID of the sample features ``fake`` ``(M, D)`` against the cached reference (:func:`fid_and_kid`).

        Returns:
            ``{prefix + "fid", prefix + "kid_mean", prefix + "kid_std"}`` as floats.
        """
        if self._real is None:  # pragma: no cover - evaluate computes it first
            raise RuntimeError("SampleQualityMonitor.compute needs the reference features; call evaluate")
        values = fid_and_kid(
            self._real, fake, kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, seed=self.seed
        )
        return dict(zip(self.names, values.values(), strict=True))

    def publish(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        """Put ``values`` in ``trainer.callback_metrics`` (every rank) and write them to the loggers (rank zero)."""
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        if any(math.isnan(value) for value in values.values()):
            rank_zero_warn(f"SampleQualityMonitor: NaN at step {step}: {values}")

    # ----------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The last evaluated step and the fingerprint of the reference features (never the features themselves).

        Returns:
            ``{"last_step", "reference"}``.
        """
        return {"last_step": self._last_step, "reference": self._reference_fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last evaluated step; the saved fingerprint is compared with the recomputed features."""
        self._last_step = state_dict.get("last_step")
        reference = state_dict.get("reference")
        self._saved_fingerprint = dict(reference) if reference is not None else None
