"""Trainer-side pieces: ``ScheduleCallback``, ``GradientCheckpointing``, ``AlphaBlenderMonitor``."""

from lightning_ldm.callbacks.blender_monitor import AlphaBlenderMonitor
from lightning_ldm.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_ldm.callbacks.schedule import ScheduleCallback

__all__ = ["AlphaBlenderMonitor", "GradientCheckpointing", "ScheduleCallback"]
