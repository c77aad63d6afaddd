"""Trainer-side pieces: seeded draws, loss by timestep, samples and their FID/KID, checkpointing, α monitor."""

from lightning_ldm.callbacks.blender_monitor import AlphaBlenderMonitor
from lightning_ldm.callbacks.diffusion_seed import DiffusionSeedCallback, ScheduleCallback
from lightning_ldm.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_ldm.callbacks.sample_logger import SampleLogger
from lightning_ldm.callbacks.sample_quality import SampleQualityMonitor
from lightning_ldm.callbacks.timestep_loss_monitor import TimestepLossMonitor

__all__ = [
    "AlphaBlenderMonitor",
    "DiffusionSeedCallback",
    "GradientCheckpointing",
    "SampleLogger",
    "SampleQualityMonitor",
    "ScheduleCallback",
    "TimestepLossMonitor",
]
