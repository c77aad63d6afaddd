"""Trainer-side pieces: seeding and sampler, loss-by-timestep monitor, gradient checkpointing, α monitor."""

from lightning_ldm.callbacks.blender_monitor import AlphaBlenderMonitor
from lightning_ldm.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_ldm.callbacks.schedule import ScheduleCallback
from lightning_ldm.callbacks.timestep_loss_monitor import TimestepLossMonitor

__all__ = ["AlphaBlenderMonitor", "GradientCheckpointing", "ScheduleCallback", "TimestepLossMonitor"]
