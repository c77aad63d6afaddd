"""lightning_ldm: the latent-diffusion utilities, exact and hardened, the PyTorch Lightning way."""

from lightning_ldm.blending import AlphaBlender
from lightning_ldm.checkpointing import CheckpointFunction, checkpoint
from lightning_ldm.config import HybridConditioner, instantiate_from_config
from lightning_ldm.ddim import make_ddim_sampling_parameters, make_ddim_timesteps
from lightning_ldm.embedding import SinusoidalTimestepEmbedding, timestep_embedding
from lightning_ldm.nn import avg_pool_nd, extract_into_tensor, mean_flat, noise_like, scale_module, zero_module
from lightning_ldm.noising import q_sample
from lightning_ldm.schedules import betas_for_alpha_bar, make_beta_schedule, rescale_zero_terminal_snr

__version__ = "0.1.0.dev0"

__all__ = [
    "AlphaBlender",
    "CheckpointFunction",
    "HybridConditioner",
    "SinusoidalTimestepEmbedding",
    "avg_pool_nd",
    "betas_for_alpha_bar",
    "checkpoint",
    "extract_into_tensor",
    "instantiate_from_config",
    "make_beta_schedule",
    "make_ddim_sampling_parameters",
    "make_ddim_timesteps",
    "mean_flat",
    "noise_like",
    "q_sample",
    "rescale_zero_terminal_snr",
    "scale_module",
    "timestep_embedding",
    "zero_module",
]
