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
