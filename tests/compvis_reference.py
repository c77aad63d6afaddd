"""CompVis' formulas, transcribed as test oracles: one copy for the whole suite.

Each function is written the way the reference code (CompVis ``ldm/modules/diffusionmodules/util.py``, ``ldm/models/
diffusion/ddpm.py``) writes it: the same library calls in the same order, so that the package can be compared with it
bitwise where it promises to be bitwise. Nothing here validates arguments, logs or prints; where the reference
raises, this module raises the same exception. Do not import ``lightning_ldm`` here: an oracle that calls the code
under test checks nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
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


# ------------------------------------------------------------------ CompVis' LatentDiffusion, its state-dict layout
# ``ldm/modules/distributions/distributions.py``, ``ldm/modules/ema.py`` and ``ldm/models/diffusion/ddpm.py``: the
# parts that decide the state-dict keys (``model.diffusion_model.*``, ``model_ema.*``, ``first_stage_model.*``,
# ``cond_stage_model.*``, the schedule buffers, ``scale_factor``) and what CompVis' scripts call. Configs are replaced
# by built modules; prints, logging and training code are left out.
class DiagonalGaussianDistribution:
    """CompVis' posterior: ``mean``/``logvar`` halves of the moments, ``sample`` from the global RNG."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean).to(device=self.parameters.device)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class DiffusionWrapper(torch.nn.Module):
    """CompVis' ``DiffusionWrapper``: holds the UNet as ``diffusion_model`` and routes the conditions into it."""

    def __init__(self, diffusion_model: torch.nn.Module, conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model  # CompVis: instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        assert self.conditioning_key in [None, "concat", "crossattn", "hybrid", "adm"]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.conditioning_key is None:
            out = self.diffusion_model(x, t)
        elif self.conditioning_key == "concat":
            xc = torch.cat([x, *c_concat], dim=1)  # type: ignore[misc]
            out = self.diffusion_model(xc, t)
        elif self.conditioning_key == "crossattn":
            cc = torch.cat(c_crossattn, 1)  # type: ignore[arg-type]
            out = self.diffusion_model(x, t, context=cc)
        elif self.conditioning_key == "hybrid":
            xc = torch.cat([x, *c_concat], dim=1)  # type: ignore[misc]
            cc = torch.cat(c_crossattn, 1)  # type: ignore[arg-type]
            out = self.diffusion_model(xc, t, context=cc)
        else:  # "adm"
            cc = c_crossattn[0]  # type: ignore[index]
            out = self.diffusion_model(x, t, y=cc)
        return out


class LitEma(torch.nn.Module):
    """CompVis' ``LitEma``: ``decay``, ``num_updates`` and one shadow buffer per trainable parameter, dots removed."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates",
            torch.tensor(0, dtype=torch.int) if use_num_upates else torch.tensor(-1, dtype=torch.int),
        )
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")  # remove as '.'-character is not allowed in buffers
                self.m_name2s_name.update({name: s_name})
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params: list[torch.Tensor] = []

    def forward(self, model: torch.nn.Module) -> None:
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            m_param = dict(model.named_parameters())
            shadow_params = dict(self.named_buffers())
            for key in m_param:
                if m_param[key].requires_grad:
                    sname = self.m_name2s_name[key]
                    shadow_params[sname] = shadow_params[sname].type_as(m_param[key])
                    shadow_params[sname].sub_(one_minus_decay * (shadow_params[sname] - m_param[key]))

    def copy_to(self, model: torch.nn.Module) -> None:
        m_param = dict(model.named_parameters())
        shadow_params = dict(self.named_buffers())
        for key in m_param:
            if m_param[key].requires_grad:
                m_param[key].data.copy_(shadow_params[self.m_name2s_name[key]].data)

    def store(self, parameters: Any) -> None:
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters: Any) -> None:
        for c_param, param in zip(self.collected_params, parameters, strict=False):
            param.data.copy_(c_param.data)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """CompVis' ``extract_into_tensor``: ``a[t]`` shaped to broadcast over a batch of ``x_shape``."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


class LatentDiffusion(torch.nn.Module):
    """CompVis' ``DDPM`` + ``LatentDiffusion`` as far as the state dict and the sampling scripts see them.

    ``unet``, ``first_stage`` and ``cond_stage`` stand for the modules CompVis instantiates from its configs
    (``cond_stage=None``: ``"__is_unconditional__"``). ``parameterization="v"`` and ``predict_*_from_z_and_v`` are
    Stability's SD 2 additions to the same class.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        first_stage: torch.nn.Module,
        cond_stage: torch.nn.Module | None = None,
        *,
        conditioning_key: str | None = "crossattn",
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        parameterization: str = "eps",
        v_posterior: float = 0.0,
        use_ema: bool = True,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        cond_stage_forward: str | None = None,
    ) -> None:
        super().__init__()
        self.parameterization = parameterization
        self.cond_stage_model: torch.nn.Module | None = None
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.v_posterior = v_posterior
        self.register_schedule(None, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.scale_by_std = scale_by_std
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.first_stage_model = freeze_stage(first_stage)  # instantiate_first_stage
        self.cond_stage_model = None if cond_stage is None else freeze_stage(cond_stage)  # instantiate_cond_stage
        self.cond_stage_forward = cond_stage_forward

    def register_schedule(
        self,
        given_betas: np.ndarray | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        if given_betas is not None:
            betas = given_betas
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        (timesteps,) = betas.shape
        self.num_timesteps = int(timesteps)

        def to_torch(a: Any) -> torch.Tensor:
            return torch.tensor(a, dtype=torch.float32)

        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer(
            "posterior_mean_coef1", to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        )
        self.register_buffer(
            "posterior_mean_coef2", to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))
        )
        if self.parameterization == "eps":
            lvlb_weights = self.betas**2 / (2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb_weights = 0.5 * torch.sqrt(torch.Tensor(alphas_cumprod)) / (2.0 * 1 - torch.Tensor(alphas_cumprod))
        elif self.parameterization == "v":
            lvlb_weights = torch.ones_like(self.betas**2 / (2 * self.posterior_variance * to_torch(alphas)))
        else:
            raise NotImplementedError("mu not supported")
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        )

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    def get_learned_conditioning(self, c: Any) -> Any:
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)  # type: ignore[misc]
        else:
            assert hasattr(self.cond_stage_model, self.cond_stage_forward)
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if isinstance(cond, dict):
            pass  # hybrid case, cond is expected to be a dict
        else:
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple):
            return x_recon[0]
        return x_recon
