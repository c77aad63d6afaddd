"""CompVis' formulas, transcribed as test oracles: one copy for the whole suite.

Each function is written the way the reference code (CompVis ``ldm/modules/diffusionmodules/util.py``, ``ldm/models/
diffusion/ddpm.py``) writes it: the same library calls in the same order, so that the package can be compared with it
bitwise where it promises to be bitwise. Nothing here validates arguments, logs or prints; where the reference
raises, this module raises the same exception. Do not import ``lightning_ldm`` here: an oracle that calls the code
under test checks nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: Stable Diffusion's schedule: CompVis' "linear" with these endpoints (diffusers calls it "scaled_linear").
SD_LINEAR = {"linear_start": 0.00085, "linear_end": 0.012}

#: The names ``register_schedule`` gives its tables, in its order, then the package's SNR table.
TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "snr",
)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """CompVis' ``make_beta_schedule``: torch float64 maths, ``np.clip`` on the cosine, a numpy result.

    ``"squaredcos_cap_v2"`` is not in CompVis: it is written as diffusers' ``betas_for_alpha_bar`` with the cosine
    ``alpha_bar`` (math-module floats, ``min(·, 0.999)``), which the package adds under that name.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = timesteps / (1 + cosine_s) * np.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        return np.clip(betas.numpy(), a_min=0, a_max=0.999)
    elif schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n_timestep) / alpha_bar(i / n_timestep), 0.999) for i in range(n_timestep)]
        )
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1, in float64 numpy.

    Not in CompVis (which predates it); kept here so that the suite has one oracle for it.
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1 - np.asarray(betas, dtype=np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def register_schedule_tables(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The float64 tables of CompVis' ``DDPM.register_schedule`` (before its float32 cast), keyed by ``TABLE_NAMES``.

    ``snr`` (ā/(1 − ā)) is the package's addition. Edge cases (ā = 0 or 1) give inf/nan as in the reference, without
    numpy warnings: compare only where the reference is finite.
    """
    with np.errstate(all="ignore"):
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + v_posterior * betas
        return {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }


def lvlb_weights(betas: np.ndarray, parameterization: str = "eps", v_posterior: float = 0.0) -> np.ndarray:
    """CompVis' ``lvlb_weights`` in float64, with ``w[0] = w[1]``; nan/inf where the reference divides by zero.

    The ``"x0"`` weight is the intended ``0.5·√ā / (2·(1 − ā))``, not the reference's precedence slip
    ``0.5·√ā / (2·1 − ā)`` (``x0_precedence_slip`` below gives that one).
    """
    tables = register_schedule_tables(betas, v_posterior)
    ac = tables["alphas_cumprod"]
    with np.errstate(all="ignore"):
        if parameterization == "eps":
            weights = betas**2 / (2 * tables["posterior_variance"] * (1 - betas) * (1 - ac))
        elif parameterization == "x0":
            weights = 0.5 * np.sqrt(ac) / (2.0 * (1 - ac))
        elif parameterization == "v":
            weights = np.ones_like(betas)
        else:
            raise NotImplementedError("mu not supported")
    weights = weights.copy()
    weights[0] = weights[1]
    return weights


def x0_precedence_slip(betas: np.ndarray) -> np.ndarray:
    """The reference's literal ``"x0"`` weight, ``0.5·√ā / (2. * 1 − ā)`` (an operator-precedence slip)."""
    ac = np.cumprod(1.0 - betas)
    return 0.5 * np.sqrt(ac) / (2.0 * 1 - ac)


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis' ``make_ddim_timesteps`` (without its print): ``"uniform"`` and ``"quad"``, shifted by one."""
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    return ddim_timesteps + 1


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CompVis' ``make_ddim_sampling_parameters`` (without its print): ``(sigmas, alphas, alphas_prev)``."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())  # noqa: RUF005 (as CompVis)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """CompVis' ``timestep_embedding``: float32 frequencies, ``[cos | sin]``, a zero column for odd ``dim``."""
    if not repeat_only:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=timesteps.device
        )
        args = timesteps[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    else:
        embedding = timesteps[:, None].expand(-1, dim)  # CompVis: einops.repeat(timesteps, "b -> b d", d=dim)
    return embedding


def disabled_train(self: Any, mode: bool = True) -> Any:
    """CompVis' ``disabled_train`` (``ldm/models/diffusion/ddpm.py``): set as an *instance* attribute, unbound."""
    return self


def freeze_stage(model: torch.nn.Module) -> torch.nn.Module:
    """CompVis' ``instantiate_first_stage``/``instantiate_cond_stage`` after building ``model``: eval, then
    ``model.train = disabled_train`` and every parameter frozen. Afterwards ``model.eval()`` (``model.train(False)``)
    calls ``disabled_train(False)`` and returns ``False``; the model's mode no longer changes."""
    frozen = model.eval()
    frozen.train = disabled_train  # type: ignore[method-assign]
    for param in frozen.parameters():
        param.requires_grad = False
    return frozen
