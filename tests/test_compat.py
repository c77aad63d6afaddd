"""CompVisCompat: CompVis' names on a diffusion module, opt-in, reading the module's NoiseSchedule."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lightning_ldm.compat import CompVisCompat
from lightning_ldm.latent import LatentDiffusionMixin
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import SCHEDULE_TABLES
from tests import compvis_reference as compvis


class Plain(DiffusionMixin, L.LightningModule):
    def __init__(self, parameterization: str = "eps") -> None:
        super().__init__()
        self.register_schedule(beta_schedule="cosine", timesteps=50, parameterization=parameterization)
        self.net = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WithCompat(CompVisCompat, Plain):
    pass


class LatentWithCompat(CompVisCompat, LatentDiffusionMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_schedule(beta_schedule="linear", timesteps=40, parameterization="v")
        self.model = nn.Linear(4, 4)


def test_compvis_names_are_opt_in() -> None:
    plain, compat = Plain(), WithCompat()
    for name in (*SCHEDULE_TABLES, "num_timesteps", "parameterization", "q_sample", "q_posterior"):
        assert not hasattr(plain, name), name
        assert hasattr(compat, name), name


@pytest.mark.parametrize("module_cls", [WithCompat, LatentWithCompat])
def test_each_table_is_the_schedules_table_on_the_module_device(module_cls: type) -> None:
    module = module_cls()
    schedule = module.noise_schedule
    for name in SCHEDULE_TABLES:
        table = getattr(module, name)
        assert table.dtype == torch.float32 and table.device == torch.device("cpu")
        assert torch.equal(table, schedule.table(name)), name
    assert module.num_timesteps == schedule.num_timesteps
    assert module.parameterization == schedule.parameterization


def test_tables_match_compvis_register_schedule() -> None:
    module = WithCompat()
    reference = compvis.register_schedule_tables(compvis.make_beta_schedule("cosine", 50))
    for name, expected in reference.items():
        ours = getattr(module, "snr_table" if name == "snr" else name)
        assert torch.equal(ours, torch.as_tensor(expected).to(torch.float32)), name


def test_a_table_cannot_be_assigned() -> None:
    module = WithCompat()
    with pytest.raises(AttributeError, match=r"alphas_cumprod is a table of the noise schedule; call register_sched"):
        module.alphas_cumprod = torch.zeros(50)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_identities_are_the_schedules(parameterization: str) -> None:
    module, g = WithCompat(parameterization), torch.Generator().manual_seed(0)
    schedule = module.noise_schedule
    x0, noise, x_t = (torch.randn(3, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 17, 49])
    assert torch.equal(module.q_sample(x0, t, noise), schedule.q_sample(x0, t, noise))
    assert torch.equal(module.predict_start_from_noise(x_t, t, noise), schedule.predict_start_from_noise(x_t, t, noise))
    assert torch.equal(module.get_v(x0, noise, t), schedule.get_v(x0, noise, t))
    assert torch.equal(module.predict_start_from_z_and_v(x_t, t, noise), schedule.predict_start_from_v(x_t, t, noise))
    assert torch.equal(module.predict_eps_from_z_and_v(x_t, t, noise), schedule.predict_noise_from_v(x_t, t, noise))
    for ours, theirs in zip(module.q_posterior(x0, x_t, t), schedule.q_posterior(x0, x_t, t), strict=True):
        assert torch.equal(ours, theirs)


def test_q_sample_draws_its_noise_from_the_diffusion_generator() -> None:
    module = WithCompat()
    x0, t = torch.randn(2, 4), torch.tensor([3, 40])
    module.diffusion_generator = torch.Generator().manual_seed(7)
    drawn = module.q_sample(x0, t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, module.noise_schedule.q_sample(x0, t, noise))


def test_compvis_state_dict_with_tables_loads_and_a_differing_table_is_refused() -> None:
    source, target = WithCompat(), WithCompat()
    state = {**source.state_dict(), **{name: getattr(source, name).clone() for name in SCHEDULE_TABLES}}
    target.load_state_dict(state)  # strict: the tables are compared and dropped, not unexpected
    state["betas"] = state["betas"] * 1.01
    with pytest.raises(RuntimeError, match=r"the state dict's schedule table 'betas' differs at torch.float32"):
        target.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "betas"'):
        Plain().load_state_dict(state)  # without the compat layer, CompVis' tables are not ours to load


# ------------------------------------------------------------------------ CompVis' LatentDiffusion surface (issue 15)
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.drop = nn.Dropout(0.5)

    def encode(self, c: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(c))

    def embed(self, c: torch.Tensor) -> torch.Tensor:
        return 2 * self.lin(c)


class LatentAE(nn.Module):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z[:, :1]], dim=1)


class LatentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1 + t.float()[:, None, None, None] / 40)


def latent_with_stage(scale: float = 0.5) -> LatentWithCompat:
    module = LatentWithCompat()
    module.register_first_stage(LatentAE(), scale_factor=scale)
    return module


def test_first_stage_names_are_compvis() -> None:
    module = latent_with_stage(0.5)
    assert module.first_stage is not None and module.first_stage_model is module.first_stage.autoencoder
    assert module.scale_factor == 0.5
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    posterior = module.encode_first_stage(x)  # CompVis: the posterior, unscaled
    assert torch.equal(posterior, x[:, :2])
    assert torch.equal(module.get_first_stage_encoding(posterior), 0.5 * x[:, :2])
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = 1.0 / 0.5 * z
    assert torch.equal(module.decode_first_stage(z), torch.cat([expected, expected[:, :1]], dim=1))
    with pytest.raises(AttributeError, match=r"has no attribute 'first_stage_model'"):
        _ = WithCompat().first_stage_model  # no LatentDiffusionMixin: not there, as on CompVis' DDPM


def test_diffusion_loss_still_encodes_to_scaled_latents_with_the_compat_layer() -> None:
    class Twin(LatentDiffusionMixin, L.LightningModule):  # the same module without CompVis' names
        def __init__(self) -> None:
            super().__init__()
            self.register_schedule(beta_schedule="linear", timesteps=40, parameterization="v")
            self.model = LatentNet()

    compat, twin = latent_with_stage(0.5), Twin()
    compat.model = LatentNet()
    twin.register_first_stage(LatentAE(), scale_factor=0.5)
    twin.model.load_state_dict(compat.model.state_dict())
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    losses = []
    for module in (compat, twin):
        module.diffusion_generator = torch.Generator().manual_seed(3)
        losses.append(module.diffusion_loss(x))
    assert torch.equal(losses[0], losses[1]) and float(losses[0]) > 0


def test_register_cond_stage_freezes_and_get_learned_conditioning_calls_encode() -> None:
    module = latent_with_stage()
    assert module.cond_stage_model is None
    with pytest.raises(AttributeError, match=r"has no cond_stage_model: call self.register_cond_stage\(encoder\)"):
        module.get_learned_conditioning(torch.zeros(1, 3))
    encoder = Encoder()
    module.register_cond_stage(encoder)
    assert module.cond_stage_model is encoder and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not {id(p) for p in encoder.parameters()} & {id(p) for p in module.trainable_parameters()}
    module.train()
    assert module.training and not encoder.training and not encoder.drop.training  # frozen: stays in eval
    c = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module.get_learned_conditioning(c), encoder.lin(c))  # encode in eval: no dropout
    assert "cond_stage_model.lin.weight" in module.state_dict()
    module.register_cond_stage(encoder, forward="embed")
    assert torch.equal(module.get_learned_conditioning(c), 2 * encoder.lin(c))
    trainable = Encoder()
    module.register_cond_stage(trainable, trainable=True)
    module.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_register_cond_stage_refuses_bad_arguments() -> None:
    module = latent_with_stage()
    with pytest.raises(TypeError, match=r"encoder must be an nn.Module, got function"):
        module.register_cond_stage(lambda c: c)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"forward must name a method of the Encoder encoder, got 'nope'"):
        module.register_cond_stage(Encoder(), forward="nope")
    with pytest.raises(TypeError, match=r"trainable must be a bool"):
        module.register_cond_stage(Encoder(), trainable="yes")  # type: ignore[arg-type]


def test_ema_scope_without_a_trainer_keeps_the_training_weights() -> None:
    module = latent_with_stage()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with module.ema_scope("Plotting"):
        inside = module.state_dict()
        assert all(torch.equal(before[k], inside[k]) for k in before)


def test_the_holder_gives_compvis_keys_and_passes_arguments_on() -> None:
    from lightning_ldm.compat import DiffusionModelHolder

    net = nn.Linear(4, 4)
    holder = DiffusionModelHolder(net)
    assert list(holder.state_dict()) == ["diffusion_model.weight", "diffusion_model.bias"]
    x = torch.randn(2, 4)
    assert torch.equal(holder(x), net(x))
    with pytest.raises(TypeError, match=r"diffusion_model must be an nn.Module, got int"):
        DiffusionModelHolder(3)  # type: ignore[arg-type]
