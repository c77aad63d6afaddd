"""Trainer-side pieces: seeding, loss by timestep, samples and their FID/KID, checkpointing, α monitor."""

from lightning_ldm.callbacks.blender_monitor import AlphaBlenderMonitor
from lightning_ldm.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_ldm.callbacks.sample_logger import SampleLogger
from lightning_ldm.callbacks.sample_quality import SampleQualityMonitor
from lightning_ldm.callbacks.schedule import ScheduleCallback
from lightning_ldm.callbacks.timestep_loss_monitor import TimestepLossMonitor

__all__ = [
    "AlphaBlenderMonitor",
    "GradientCheckpointing",
    "SampleLogger",
    "SampleQualityMonitor",
    "ScheduleCallback",
    "TimestepLossMonitor",
]
