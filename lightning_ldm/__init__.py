"""lightning_ldm: the latent-diffusion utilities, exact and hardened, the PyTorch Lightning way.

The functional core (schedules, DDIM, noising, embeddings, checkpointing, blending, config) imports torch, numpy and
einops only. The Lightning layer (``DiffusionMixin`` here, the callbacks in :mod:`lightning_ldm.callbacks`) is
imported on first use, so ``import lightning_ldm`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_ldm.blending import AlphaBlender
from lightning_ldm.checkpointing import CheckpointFunction, checkpoint
from lightning_ldm.conditioning import (
    CONDITIONING_KEYS,
    HybridConditioner,
    apply_conditioned,
    as_cond_dict,
    drop_conditions,
)
from lightning_ldm.ddim import DDIMMethod, ddim_sample, ddim_step, make_ddim_sampling_parameters, make_ddim_timesteps
from lightning_ldm.embedding import SinusoidalTimestepEmbedding, timestep_embedding
from lightning_ldm.features import InceptionFeatures, RandomConvFeatures
from lightning_ldm.first_stage import FirstStage
from lightning_ldm.guidance import guided_model
from lightning_ldm.instantiation import ConfigImportError, get_obj_from_str, instantiate_from_config
from lightning_ldm.interop import from_diffusers_config, to_diffusers_config
from lightning_ldm.losses import diffusion_loss
from lightning_ldm.metrics import TimestepBucketLoss
from lightning_ldm.noise_schedule import NoiseSchedule
from lightning_ldm.noising import get_v, predict_noise_from_v, predict_start_from_noise, predict_start_from_v, q_sample
from lightning_ldm.ops import avg_pool_nd, extract_into_tensor, mean_flat, noise_like, scale_module, zero_module
from lightning_ldm.parameterization import min_snr_weights
from lightning_ldm.schedule_config import ScheduleConfig
from lightning_ldm.scheduler_sampling import scheduler_sample
from lightning_ldm.schedules import (
    ScheduleName,
    betas_for_alpha_bar,
    log_snr,
    make_beta_schedule,
    rescale_zero_terminal_snr,
    schedule_tables,
    snr,
)
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, TimestepSampler, UniformSampler
from lightning_ldm.validation import fixed_noise, fixed_timestep_losses

if TYPE_CHECKING:
    from lightning_ldm.callbacks import (
        AlphaBlenderMonitor,
        DiffusionSeedCallback,
        GradientCheckpointing,
        SampleLogger,
        SampleQualityMonitor,
        ScheduleCallback,
        TimestepLossMonitor,
    )
    from lightning_ldm.compat import CompVisCompat
    from lightning_ldm.compvis_checkpoint import from_compvis_state_dict, to_compvis_state_dict
    from lightning_ldm.diffusers_export import export_diffusers, load_diffusers
    from lightning_ldm.latent import LatentDiffusionMixin
    from lightning_ldm.mixin import DiffusionMixin

__version__ = "0.2.0.dev0"

_LAZY = {
    "DiffusionMixin": "lightning_ldm.mixin",
    "LatentDiffusionMixin": "lightning_ldm.latent",
    "SampleLogger": "lightning_ldm.callbacks",
    "DiffusionSeedCallback": "lightning_ldm.callbacks",
    "SampleQualityMonitor": "lightning_ldm.callbacks",
    "ScheduleCallback": "lightning_ldm.callbacks",
    "CompVisCompat": "lightning_ldm.compat",
    "export_diffusers": "lightning_ldm.diffusers_export",
    "load_diffusers": "lightning_ldm.diffusers_export",
    "from_compvis_state_dict": "lightning_ldm.compvis_checkpoint",
    "to_compvis_state_dict": "lightning_ldm.compvis_checkpoint",
    "TimestepLossMonitor": "lightning_ldm.callbacks",
    "GradientCheckpointing": "lightning_ldm.callbacks",
    "AlphaBlenderMonitor": "lightning_ldm.callbacks",
}


def __getattr__(name: str) -> Any:
    """Import the Lightning layer on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ldm' has no attribute {name!r}")


__all__ = [
    "CONDITIONING_KEYS",
    "AlphaBlender",
    "AlphaBlenderMonitor",
    "CheckpointFunction",
    "CompVisCompat",
    "ConfigImportError",
    "DDIMMethod",
    "DiffusionMixin",
    "DiffusionSeedCallback",
    "FirstStage",
    "GradientCheckpointing",
    "HybridConditioner",
    "InceptionFeatures",
    "LatentDiffusionMixin",
    "LogitNormalSampler",
    "LossAwareSampler",
    "NoiseSchedule",
    "RandomConvFeatures",
    "SampleLogger",
    "SampleQualityMonitor",
    "ScheduleCallback",
    "ScheduleConfig",
    "ScheduleName",
    "SinusoidalTimestepEmbedding",
    "TimestepBucketLoss",
    "TimestepLossMonitor",
    "TimestepSampler",
    "UniformSampler",
    "apply_conditioned",
    "as_cond_dict",
    "avg_pool_nd",
    "betas_for_alpha_bar",
    "checkpoint",
    "ddim_sample",
    "ddim_step",
    "diffusion_loss",
    "drop_conditions",
    "export_diffusers",
    "extract_into_tensor",
    "fixed_noise",
    "fixed_timestep_losses",
    "from_compvis_state_dict",
    "from_diffusers_config",
    "get_obj_from_str",
    "get_v",
    "guided_model",
    "instantiate_from_config",
    "load_diffusers",
    "log_snr",
    "make_beta_schedule",
    "make_ddim_sampling_parameters",
    "make_ddim_timesteps",
    "mean_flat",
    "min_snr_weights",
    "noise_like",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "q_sample",
    "rescale_zero_terminal_snr",
    "scale_module",
    "schedule_tables",
    "scheduler_sample",
    "snr",
    "timestep_embedding",
    "to_compvis_state_dict",
    "to_diffusers_config",
    "zero_module",
]
