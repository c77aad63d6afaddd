"""Tests of DiffusionMixin: tables, precision, noising identities, loss, sampling, checkpoint fingerprint.

Reference numbers are computed independently here in numpy float64 from the betas.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.checkpointing import checkpoint
from lightning_ldm.compat import CompVisCompat
from lightning_ldm.ddim import ddim_sample as core_ddim_sample
from lightning_ldm.embedding import timestep_embedding
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.noise_schedule import SCHEDULE_TABLES
from tests import compvis_reference as compvis
from tests.lightning_helpers import make_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

TABLE_NAMES = SCHEDULE_TABLES


# ----------------------------------------------------------------------------------------------------- helpers
class Toy(CompVisCompat, DiffusionMixin, L.LightningModule):
    """A 1x1-conv denoiser over (B, 2, 4, 4) samples, with CompVis' names (the tables these tests read)."""

    def __init__(
        self,
        timesteps: int = 100,
        beta_schedule: str = "linear",
        parameterization: str = "eps",
        zero_terminal_snr: bool = False,
        loss_weighting: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_schedule(
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            zero_terminal_snr=zero_terminal_snr,
            parameterization=parameterization,  # type: ignore[arg-type]
        )
        self.net = nn.Conv2d(2, 2, 1)
        self.seen: list[dict[str, Any]] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion_loss(batch[0], loss_weighting=self.hparams.loss_weighting)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 2, 4, 4, generator=g)), batch_size=4)


def ref_betas(schedule: str, n: int, ls: float = 1e-4, le: float = 2e-2, s: float = 8e-3) -> np.ndarray:
    return compvis.make_beta_schedule(schedule, n, linear_start=ls, linear_end=le, cosine_s=s)


ref_ztsnr = compvis.rescale_zero_terminal_snr


def ref_tables(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    tables = compvis.register_schedule_tables(betas, v_posterior)
    tables["snr_table"] = tables.pop("snr")
    return tables


def bare(**kwargs: Any) -> Toy:
    return Toy(**kwargs)


def denoising_with(model: Toy, net: Any) -> Toy:
    """``model`` with ``net`` as its denoiser: what ``apply_model`` (so the loss and the samplers) calls."""
    model.denoiser_name = "denoiser"
    model.denoiser = net
    return model


def as_np(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def bshape(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------------------------------ register_schedule
@pytest.mark.parametrize(
    ("schedule", "ztsnr", "v_posterior"),
    [("linear", False, 0.0), ("cosine", False, 0.0), ("sqrt_linear", False, 0.3), ("linear", True, 0.0)],
)
def test_tables_match_float64_formulas(schedule: str, ztsnr: bool, v_posterior: float) -> None:
    model = bare(timesteps=200)
    model.register_schedule(beta_schedule=schedule, timesteps=200, zero_terminal_snr=ztsnr, v_posterior=v_posterior)
    betas = ref_betas(schedule, 200)
    if ztsnr:
        betas = ref_ztsnr(betas)
    ref = ref_tables(betas, v_posterior)
    for name in TABLE_NAMES:
        table = getattr(model, name)
        assert table.dtype == torch.float32, name
        assert torch.isfinite(table).all(), name
        if name in ref:
            expected = ref[name]
            ok = np.isfinite(expected)
            if ztsnr:  # the terminal step (ā = 0) is documented to use a finite stand-in in the reciprocal tables
                ok[-1] = name not in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
                ok[-1] &= name not in ("log_one_minus_alphas_cumprod",) or np.isfinite(expected[-1])
            np.testing.assert_allclose(as_np(table)[ok], expected[ok], rtol=2e-6, atol=1e-12, err_msg=name)
    assert model.num_timesteps == 200
    if ztsnr:
        assert model.alphas_cumprod[-1].item() == 0.0
        assert model.noise_schedule.snr(torch.tensor([199])).item() == 0.0


def test_table_dtype_float64_keeps_the_exact_numbers() -> None:
    model = bare()
    model.register_schedule(timesteps=100, table_dtype=torch.float64)
    ref = ref_tables(ref_betas("linear", 100))
    for name in ("alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef2"):
        assert getattr(model, name).dtype == torch.float64
        np.testing.assert_allclose(as_np(getattr(model, name)), ref[name], rtol=1e-13)


def test_given_betas_accepts_numpy_torch_and_sequences() -> None:
    betas = ref_betas("sqrt_linear", 50)
    models = []
    for betas_in in (betas, torch.tensor(betas), torch.tensor(betas, dtype=torch.float32).double(), betas.tolist()):
        model = bare()
        model.register_schedule(given_betas=betas_in)
        models.append(model)
    assert models[0].num_timesteps == 50
    np.testing.assert_allclose(as_np(models[0].alphas_cumprod), np.cumprod(1 - betas), rtol=1e-6)
    for other in (models[1], models[3]):  # the same float64 betas, whatever the container
        assert torch.equal(other.alphas_cumprod, models[0].alphas_cumprod)
    fp = models[0].noise_schedule.fingerprint
    assert fp["beta_schedule"] == "given" and fp["timesteps"] == 50 and len(fp["betas_sha256"]) == 16
    assert models[1].noise_schedule.fingerprint == fp and models[3].noise_schedule.fingerprint == fp
    assert models[2].noise_schedule.fingerprint["betas_sha256"] != fp["betas_sha256"]  # rounded through float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"parameterization": "score"}, ValueError, r"parameterization='score'.*'eps', 'x0', 'v'"),
        ({"table_dtype": torch.bfloat16}, ValueError, r"table_dtype=torch.bfloat16.*float32 or torch.float64"),
        ({"table_dtype": torch.float16}, ValueError, r"table_dtype=torch.float16"),
        ({"beta_schedule": "quadratic"}, ValueError, r"beta_schedule='quadratic'.*'linear', 'cosine'"),
        ({"timesteps": 0}, ValueError, r"timesteps=0 is out of range; expected an integer >= 2"),
        ({"timesteps": 1}, ValueError, r"timesteps=1 is out of range; expected an integer >= 2"),
        ({"timesteps": 10.5}, TypeError, r"timesteps must be an integer, got 10.5"),
        ({"linear_start": -1e-4}, ValueError, r"linear_start=-0.0001"),
        ({"linear_end": 1.5}, ValueError, r"outside \[0, 1\)"),
        ({"cosine_s": -1.0, "beta_schedule": "cosine"}, ValueError, r"cosine_s=-1"),
        ({"v_posterior": 1.5}, ValueError, r"v_posterior=1.5.*\[0, 1\]"),
        ({"zero_terminal_snr": 1}, TypeError, r"zero_terminal_snr must be a bool, got 1"),
        (
            {"given_betas": [0.1]},
            ValueError,
            r"given_betas must be a 1-D array of at least 2 per-timestep betas, got shape \(1,\)",
        ),
        ({"given_betas": [[0.1, 0.2]]}, ValueError, r"given_betas must be a 1-D array"),
        (
            {"given_betas": [0.1, float("nan")]},
            ValueError,
            r"given_betas\[1\]=nan is not finite; expected betas in \[0, 1\)",
        ),
        ({"given_betas": [0.1, 1.0, 0.2]}, ValueError, r"given_betas\[1\]=1.0 lies outside \[0, 1\)"),
        ({"given_betas": [0.1, -0.2]}, ValueError, r"given_betas\[1\]=-0.2 lies outside \[0, 1\)"),
        ({"given_betas": "0.1 0.2"}, TypeError, r"given_betas must be a 1-D sequence.*str"),
        ({"given_betas": ["a", "b"]}, TypeError, r"given_betas must be a 1-D sequence.*\['a', 'b'\]"),
        ({"given_betas": torch.tensor([True, False])}, TypeError, r"given_betas must hold real numbers.*torch.bool"),
    ],
)
def test_register_schedule_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = bare()
    before = model.alphas_cumprod.clone()
    with pytest.raises(error, match=match):
        model.register_schedule(**kwargs)
    assert torch.equal(model.alphas_cumprod, before)  # a refused call leaves the old schedule in place


def test_given_betas_ending_in_one_is_a_zero_terminal_snr_schedule() -> None:
    betas = ref_ztsnr(ref_betas("linear", 50))
    model = bare(parameterization="v")
    model.register_schedule(given_betas=betas, parameterization="v")
    assert model.alphas_cumprod[-1].item() == 0.0
    assert all(torch.isfinite(getattr(model, n)).all() for n in TABLE_NAMES)


def test_mixin_must_come_first_and_needs_a_schedule() -> None:
    class Wrong(L.LightningModule, DiffusionMixin):
        def __init__(self) -> None:
            super().__init__()
            self.register_schedule(timesteps=10)

    with pytest.raises(TypeError, match=r"lists DiffusionMixin after LightningModule.*class M\(DiffusionMixin"):
        Wrong()

    class NotAModule(DiffusionMixin):
        pass

    with pytest.raises(TypeError, match=r"must subclass torch.nn.Module"):
        NotAModule().register_schedule(timesteps=10)

    class NoSchedule(CompVisCompat, DiffusionMixin, L.LightningModule):
        pass

    model = NoSchedule()
    assert model.noise_schedule is None
    for call in (
        lambda: model.q_sample(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)),
        lambda: model.draw_timesteps(3),
        lambda: model.snr_table,
        lambda: model.diffusion_loss(torch.zeros(1, 2)),
        lambda: model.sample((1, 2)),
    ):
        with pytest.raises(RuntimeError, match=r"NoSchedule has no noise schedule: call self.register_schedule"):
            call()


def test_tables_are_not_module_state_and_reregistering_replaces_them() -> None:
    model = bare()
    assert not set(TABLE_NAMES) & {name for name, _ in model.named_buffers()}
    assert set(model.state_dict()) == {"net.weight", "net.bias"}
    with pytest.raises(AttributeError, match=r"betas is a table of the noise schedule; call register_schedule"):
        model.betas = torch.zeros(3)
    model.register_schedule(beta_schedule="cosine", timesteps=30)
    assert model.num_timesteps == 30 and model.betas.shape == (30,)
    np.testing.assert_allclose(as_np(model.betas), ref_betas("cosine", 30), rtol=1e-6)


# ------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64])
def test_tables_survive_dtype_casts_but_follow_device_moves(table_dtype: torch.dtype) -> None:
    model = bare()
    model.register_schedule(timesteps=100, table_dtype=table_dtype)
    expected = {name: getattr(model, name).clone() for name in TABLE_NAMES}
    casts = [
        lambda m: m.half(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.type(torch.bfloat16),
    ]
    for cast in casts:
        cast(model)
        for name, value in expected.items():
            assert torch.equal(getattr(model, name), value), name
    assert model.net.weight.dtype == torch.bfloat16  # the other parameters were cast
    model.to("meta")
    assert model.net.weight.device.type == "meta"
    assert torch.equal(model.alphas_cumprod, expected["alphas_cumprod"])  # a meta module reads its tables on the CPU


def test_tables_keep_their_values_through_meta_init_and_to_empty() -> None:
    reference = bare()
    with torch.device("meta"):
        model = bare()
    assert model.net.weight.is_meta and model.alphas_cumprod.device.type == "cpu"
    model.to_empty(device="cpu")
    assert not model.net.weight.is_meta
    for name in TABLE_NAMES:
        assert torch.equal(getattr(model, name), getattr(reference, name)), name
    reference.to_empty(device="cpu")  # to_empty on a materialized model keeps the tables too
    assert torch.equal(reference.sqrt_one_minus_alphas_cumprod, model.sqrt_one_minus_alphas_cumprod)


def test_state_dicts_carrying_tables_load_when_they_match() -> None:
    """CompVis' DDPM keeps the tables as persistent buffers: such a state dict loads strictly."""
    source = bare()
    state = dict(source.state_dict())
    state.update({name: getattr(source, name).clone() for name in TABLE_NAMES})
    state["lvlb_weights"] = torch.zeros(100)  # CompVis' own (x0: slipped) weights are not compared
    target = bare()
    target.load_state_dict(state)
    assert torch.equal(target.net.weight, source.net.weight)
    assert torch.equal(target.lvlb_weights, source.lvlb_weights)
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.99
    with pytest.raises(RuntimeError, match=r"schedule table 'alphas_cumprod' differs.*check_schedule_on_load"):
        target.load_state_dict(state)
    target.check_schedule_on_load = False
    target.load_state_dict(state)
    assert torch.equal(target.alphas_cumprod, source.alphas_cumprod)  # dropped, never loaded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noise_is_right_at_t0_and_t1_for_half_samples(dtype: torch.dtype) -> None:
    model = bare(timesteps=1000)
    model.to(dtype)  # what precision="bf16-true"/"16-true" does
    t = torch.tensor([0, 1, 10, 500, 999])
    ac = np.cumprod(1 - ref_betas("linear", 1000))[t.numpy()]
    # noise scale at x0 = 0: √(1 − ā_t), to one rounding of the result
    x_t = model.q_sample(torch.zeros(5, 2, dtype=dtype), t, torch.ones(5, 2, dtype=dtype))
    assert x_t.dtype == dtype
    rel = np.abs(as_np(x_t)[:, 0] - np.sqrt(1 - ac)) / np.sqrt(1 - ac)
    assert rel.max() <= 2.0**-8
    # the full sample: exactly the float64 result rounded once to the sample's dtype (float32 coefficients)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 256, generator=g).to(dtype), torch.randn(5, 256, generator=g).to(dtype)
    exact = np.sqrt(ac)[:, None] * as_np(x0) + np.sqrt(1 - ac)[:, None] * as_np(noise)
    assert torch.equal(model.q_sample(x0, t, noise), torch.from_numpy(exact).to(dtype))
    # what the check above catches: coefficient tables rounded to the half dtype (a module cast without the mixin's
    # protection) miss the correctly rounded value for ~10-20 % of the elements ...
    half_tables = [torch.from_numpy(v).to(dtype).float()[:, None] for v in (np.sqrt(ac), np.sqrt(1 - ac))]
    rounded_twice = (half_tables[0] * x0.float() + half_tables[1] * noise.float()).to(dtype)
    assert (rounded_twice != torch.from_numpy(exact).to(dtype)).float().mean() > 0.05
    # ... and the peers' bug (ā cast to bf16 before √(1 − ā)) gives no noise at all at t = 0 and 1
    bad = torch.sqrt(1 - torch.cumprod(1 - torch.from_numpy(ref_betas("linear", 1000)), 0).to(torch.bfloat16))
    assert bad[0].item() == 0.0 and bad[1].item() == 0.0


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_tables_stay_float32_under_true_half_training(precision: str) -> None:
    seen: dict[str, Any] = {}

    class Probe(Toy):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            seen["tables"] = {name: getattr(self, name).dtype for name in TABLE_NAMES}
            seen["weight"] = self.net.weight.dtype
            seen["input"] = batch[0].dtype
            loss = super().training_step(batch, batch_idx)
            seen["loss"] = loss.dtype
            seen["per_sample"] = self.last_timestep_losses[1].dtype  # type: ignore[index]
            return loss

    model = Probe()
    make_trainer(precision=precision, max_steps=1).fit(model)
    half = torch.bfloat16 if precision == "bf16-true" else torch.float16
    assert seen["weight"] == half and seen["input"] == half
    assert set(seen["tables"].values()) == {torch.float32}
    assert seen["loss"] == torch.float32 and seen["per_sample"] == torch.float32
    assert all(getattr(model, name).dtype == torch.float32 for name in TABLE_NAMES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_16_mixed_training_and_device_move() -> None:
    seen: dict[str, Any] = {}

    class Probe(Toy):
        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            seen["autocast"] = torch.is_autocast_enabled("cuda")
            seen["table"] = (self.alphas_cumprod.device.type, self.alphas_cumprod.dtype)
            return self.net(x)

    model = Probe()
    make_trainer(accelerator="cuda", precision="16-mixed", max_steps=2).fit(model)
    assert seen == {"autocast": True, "table": ("cuda", torch.float32)}
    model.cuda().half()
    assert model.sqrt_one_minus_alphas_cumprod.dtype == torch.float32
    x = model.q_sample(torch.zeros(2, 2, 4, 4, device="cuda", dtype=torch.half), torch.tensor([0, 1], device="cuda"))
    assert x.dtype == torch.half and bool((x != 0).all())


# ------------------------------------------------------------------------------------------------ identities
def test_identities_match_float64_formulas() -> None:
    model = bare(timesteps=1000)
    ref = ref_tables(ref_betas("linear", 1000))
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    x0, eps, x_t = (torch.randn(6, 3, 5, generator=g) for _ in range(3))
    ti = t.numpy()

    def c(name: str) -> np.ndarray:
        return bshape(ref[name][ti], 3)

    X0, E, XT = as_np(x0), as_np(eps), as_np(x_t)
    cases = {
        "q_sample": (
            model.q_sample(x0, t, eps),
            c("sqrt_alphas_cumprod") * X0 + c("sqrt_one_minus_alphas_cumprod") * E,
        ),
        "predict_start_from_noise": (
            model.predict_start_from_noise(x_t, t, eps),
            np.sqrt(1 / c("alphas_cumprod")) * XT - np.sqrt(1 / c("alphas_cumprod") - 1) * E,
        ),
        "get_v": (
            model.get_v(x0, eps, t),
            np.sqrt(c("alphas_cumprod")) * E - np.sqrt(1 - c("alphas_cumprod")) * X0,
        ),
        "predict_start_from_z_and_v": (
            model.predict_start_from_z_and_v(x_t, t, eps),
            np.sqrt(c("alphas_cumprod")) * XT - np.sqrt(1 - c("alphas_cumprod")) * E,
        ),
        "predict_eps_from_z_and_v": (
            model.predict_eps_from_z_and_v(x_t, t, eps),
            np.sqrt(c("alphas_cumprod")) * E + np.sqrt(1 - c("alphas_cumprod")) * XT,
        ),
    }
    mean, var, logvar = model.q_posterior(x0, x_t, t)
    cases["q_posterior mean"] = (mean, c("posterior_mean_coef1") * X0 + c("posterior_mean_coef2") * XT)
    cases["q_posterior variance"] = (var, c("posterior_variance"))
    cases["q_posterior log variance"] = (logvar, c("posterior_log_variance_clipped"))
    ab = ref["alphas_cumprod"][ti]
    cases["snr"] = (model.noise_schedule.snr(t), ab / (1 - ab))
    for name, (got, expected) in cases.items():
        assert got.dtype == torch.float32, name
        np.testing.assert_allclose(as_np(got), expected, rtol=2e-5, atol=2e-5, err_msg=name)
    assert var.shape == (6, 1, 1) and model.noise_schedule.snr(t).shape == (6,)


def test_results_come_back_in_the_sample_dtype() -> None:
    model = bare()
    t = torch.tensor([3, 50])
    x = torch.randn(2, 2, 4, 4).to(torch.bfloat16)
    for out in (
        model.q_sample(x, t, x),
        model.predict_start_from_noise(x, t, x),
        model.get_v(x, x, t),
        model.predict_start_from_z_and_v(x, t, x),
        model.predict_eps_from_z_and_v(x, t, x),
        model.q_posterior(x, x, t)[0],
    ):
        assert out.dtype == torch.bfloat16
    assert model.q_posterior(x, x, t)[1].dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(
    schedule=st.sampled_from(["linear", "cosine", "sqrt_linear"]),
    t=st.lists(st.integers(0, 299), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_v_and_eps_identities_round_trip(schedule: str, t: list[int], seed: int) -> None:
    model = _ROUND_TRIP_MODEL
    model.register_schedule(beta_schedule=schedule, timesteps=300, table_dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    tt = torch.tensor(t)
    x0 = torch.randn(len(t), 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, 4, generator=g, dtype=torch.float64)
    x_t = model.q_sample(x0.float(), tt, eps.float()).double()
    v = model.get_v(x0.float(), eps.float(), tt).double()
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, tt, v), x0, rtol=0, atol=5e-6)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, tt, v), eps, rtol=0, atol=5e-6)
    scale = float(model.sqrt_recip_alphas_cumprod[tt].max())
    torch.testing.assert_close(model.predict_start_from_noise(x_t, tt, eps), x0, rtol=0, atol=5e-6 * scale)


_ROUND_TRIP_MODEL = Toy(timesteps=300)


def test_identities_reject_bad_timesteps() -> None:
    model = bare()
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"t must hold integer timesteps.*torch.float32"):
        model.q_sample(x, torch.tensor([1.0, 2.0]), x)
    with pytest.raises(ValueError, match=r"t holds timestep 100, outside the valid range \[0, 99\]"):
        model.get_v(x, x, torch.tensor([1, 100]))
    with pytest.raises(ValueError, match=r"t holds timestep -1"):
        model.noise_schedule.snr(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"x_start and x_t must have the same shape, got \(2, 3\) and \(2, 4\)"):
        model.q_posterior(x, torch.zeros(2, 4), torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------------ loss
class Scale(nn.Module):
    """Deterministic model: out = 0.5·x_t + 0.01·t (broadcast); records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, dict[str, Any]]] = []

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.calls.append((x, t, kwargs))
        return 0.5 * x + 0.01 * t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def ref_weights(parameterization: str, weighting: str, ab: np.ndarray, betas: np.ndarray, gamma: float) -> np.ndarray:
    snr = ab / (1 - ab)
    if weighting == "none":
        return np.ones_like(ab)
    if weighting == "min_snr":
        with np.errstate(divide="ignore", invalid="ignore"):
            weights = {
                "eps": np.minimum(snr, gamma) / snr,
                "x0": np.minimum(snr, gamma),
                "v": np.minimum(snr, gamma) / (snr + 1),
            }[parameterization]
        return np.where(snr == 0, 1.0, weights)  # the zero-SNR terminal step keeps weight 1 (diffusers' scripts)
    raise AssertionError(weighting)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize(("loss_type", "weighting"), [("l2", "none"), ("l1", "none"), ("l2", "min_snr")])
def test_loss_matches_the_formula(parameterization: str, loss_type: str, weighting: str) -> None:
    model = bare(timesteps=1000, parameterization=parameterization)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    noise = torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 300, 800, 999])
    net = Scale()
    loss = denoising_with(model, net).diffusion_loss(
        x0, t=t, noise=noise, loss_type=loss_type, loss_weighting=weighting
    )  # type: ignore[arg-type]

    betas = ref_betas("linear", 1000)
    ab = np.cumprod(1 - betas)[t.numpy()]
    a4 = bshape(ab, 4)
    X0, N = as_np(x0), as_np(noise)
    x_t = np.sqrt(a4) * X0 + np.sqrt(1 - a4) * N
    out = 0.5 * x_t + 0.01 * bshape(t.numpy().astype(np.float64), 4)
    target = {"eps": N, "x0": X0, "v": np.sqrt(a4) * N - np.sqrt(1 - a4) * X0}[parameterization]
    err = out - target
    per = (err**2 if loss_type == "l2" else np.abs(err)).mean(axis=(1, 2, 3))
    expected = (per * ref_weights(parameterization, weighting, ab, betas, 5.0)).mean()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(as_np(net.calls[0][0]), x_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(net.calls[0][1], t)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_min_snr_weights_are_finite_and_clamp_the_right_way(parameterization: str, ztsnr: bool) -> None:
    gamma = 5.0
    model = bare(timesteps=1000, parameterization=parameterization, zero_terminal_snr=ztsnr)
    t = torch.arange(1000)
    w = model.noise_schedule.loss_weights(t, "min_snr", gamma)
    assert w is not None and w.dtype == torch.float32 and torch.isfinite(w).all()
    snr = as_np(model.noise_schedule.snr(t))
    W = as_np(w)
    betas = ref_ztsnr(ref_betas("linear", 1000)) if ztsnr else ref_betas("linear", 1000)
    expected = ref_weights(parameterization, "min_snr", np.cumprod(1 - betas), betas, gamma)
    np.testing.assert_allclose(W, expected, rtol=1e-5, atol=1e-7)
    high, low = snr > gamma, snr <= gamma
    assert high.any() and low.any()
    if parameterization == "eps":
        # clamp direction: high-SNR steps are down-weighted by γ/snr < 1, the others keep weight 1 (also snr = 0)
        np.testing.assert_allclose(W[high], gamma / snr[high], rtol=1e-5)
        assert (W[high] < 1).all() and (W[low] == 1).all() and (W <= 1).all()
    elif parameterization == "x0":
        positive = low & (snr > 0)
        assert (W[high] == gamma).all() and np.allclose(W[positive], snr[positive], rtol=1e-6)
    else:
        np.testing.assert_allclose(W[high], gamma / (snr[high] + 1), rtol=1e-5)
    if ztsnr:
        assert snr[-1] == 0.0
        assert W[-1] == 1.0  # trained, not silently dropped: zero-terminal-SNR sampling starts there


def test_min_snr_never_exceeds_the_unweighted_eps_loss() -> None:
    model = bare(timesteps=1000, zero_terminal_snr=True)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 2, 3, 3, generator=g)
    noise = torch.randn(8, 2, 3, 3, generator=g)
    results = {}
    for name, t in (
        ("clean", torch.arange(8)),
        ("noisy", torch.arange(992, 1000)),
        ("mixed", torch.arange(0, 1000, 125)),
    ):
        plain = denoising_with(model, Scale()).diffusion_loss(x0, t=t, noise=noise)
        per_plain = model.last_timestep_losses[1]  # type: ignore[index]
        weighted = denoising_with(model, Scale()).diffusion_loss(x0, t=t, noise=noise, loss_weighting="min_snr")
        per_weighted = model.last_timestep_losses[1]  # type: ignore[index]
        assert torch.isfinite(weighted)
        assert (per_weighted <= per_plain).all() and weighted <= plain
        results[name] = (plain.item(), weighted.item())
    # high-SNR steps are strongly down-weighted; at the noisiest steps (snr < γ, down to snr = 0) the weight is 1
    assert results["clean"][1] < 0.01 * results["clean"][0]
    assert results["noisy"][1] == results["noisy"][0]


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_vlb_weights_follow_compvis(parameterization: str, ztsnr: bool) -> None:
    model = bare(timesteps=1000, parameterization=parameterization, zero_terminal_snr=ztsnr)
    w = as_np(model.lvlb_weights)
    assert np.isfinite(w).all()
    betas = ref_betas("linear", 1000)
    if ztsnr:
        betas = ref_ztsnr(betas)
    ref = ref_tables(betas)
    ab = ref["alphas_cumprod"]
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = {
            "eps": betas**2 / (2 * ref["posterior_variance"] * (1 - betas) * (1 - ab)),
            "x0": 0.5 * np.sqrt(ab) / (2.0 * (1 - ab)),
            "v": np.ones_like(betas),
        }[parameterization]
    expected[0] = expected[1]
    if ztsnr and parameterization == "eps":
        assert not np.isfinite(expected[-1])  # α_T = 0: CompVis' formula divides by zero there
        expected[-1] = expected[-2]
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    if parameterization == "x0":  # not CompVis' precedence slip `2. * 1 - ā`
        slip = 0.5 * np.sqrt(ab) / (2.0 * 1 - ab)
        assert not np.allclose(w[1:], slip[1:], rtol=1e-2)
    got = model.noise_schedule.loss_weights(torch.tensor([0, 1, 999]), "vlb")
    assert got is not None
    np.testing.assert_allclose(as_np(got), expected[[0, 1, 999]], rtol=1e-5)


def test_vlb_loss_is_the_weighted_mean() -> None:
    model = bare(timesteps=100)
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0, 40, 99])
    plain = denoising_with(model, Scale()).diffusion_loss(x0, t=t, noise=noise)
    per = model.last_timestep_losses[1]  # type: ignore[index]
    vlb = denoising_with(model, Scale()).diffusion_loss(x0, t=t, noise=noise, loss_weighting="vlb")
    assert vlb.item() == pytest.approx((per * model.lvlb_weights[t]).mean().item(), rel=1e-6)
    assert plain.item() != pytest.approx(vlb.item())


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (3, 2, 2, 4, 5)])
def test_offset_noise_is_one_value_per_sample_and_channel(shape: tuple[int, ...]) -> None:
    model = bare(timesteps=100)
    model.diffusion_generator = torch.Generator().manual_seed(4)
    net = Scale()
    t = torch.tensor([99, 50, 10])
    denoising_with(model, net).diffusion_loss(torch.zeros(shape), t=t, noise=torch.zeros(shape), offset_noise=0.5)
    x_t = net.calls[0][0]
    per_channel = x_t.flatten(2)
    assert torch.equal(per_channel, per_channel[:, :, :1].expand_as(per_channel))  # constant over space (and time)
    assert per_channel[:, :, 0].abs().min() > 0
    # the offset is 0.5·N(0,1), scaled by √(1 − ā_t) like all noise: recover N(0,1) and compare with the generator
    expected = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    scale = model.sqrt_one_minus_alphas_cumprod[t].view(3, 1)
    torch.testing.assert_close(per_channel[:, :, 0], 0.5 * expected * scale)
    plain = Scale()
    denoising_with(model, plain).diffusion_loss(torch.zeros(shape), t=t, noise=torch.zeros(shape))
    assert torch.equal(plain.calls[0][0], torch.zeros(shape))


def test_last_timestep_losses_only_in_training_and_detached() -> None:
    model = bare(timesteps=100)
    model.train()
    x0 = torch.randn(4, 2, 4, 4)
    loss = model.diffusion_loss(x0)
    t, per = model.last_timestep_losses  # type: ignore[misc]
    assert t.dtype == torch.long and t.shape == (4,) and per.dtype == torch.float32 and per.shape == (4,)
    assert not per.requires_grad and loss.requires_grad
    assert per.mean().item() == pytest.approx(loss.item(), rel=1e-6)
    model.eval()
    model.diffusion_loss(x0)
    assert model.last_timestep_losses[0] is t  # type: ignore[index]


def test_loss_is_float32_under_autocast_and_for_half_models() -> None:
    model = bare(timesteps=100)
    x0 = torch.randn(4, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.net(x0)
        loss = model.diffusion_loss(x0)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert model.last_timestep_losses[1].dtype == torch.float32  # type: ignore[index]
    model.to(torch.bfloat16)
    loss = model.diffusion_loss(x0.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_type": "huber"}, ValueError, r"loss_type='huber'.*'l2', 'l1'"),
        ({"loss_weighting": "snr"}, ValueError, r"loss_weighting='snr'.*'none', 'min_snr', 'vlb'"),
        ({"min_snr_gamma": 0.0}, ValueError, r"min_snr_gamma=0 is out of range.*\(0, inf\]"),
        ({"offset_noise": -0.1}, ValueError, r"offset_noise=-0.1 is out of range"),
        ({"t": torch.tensor([1, 2])}, ValueError, r"t has 2 timesteps but x_start has batch size 4"),
        ({"t": torch.tensor([1, 2, 3, 100])}, ValueError, r"t holds timestep 100"),
        ({"t": torch.ones(4)}, TypeError, r"t must hold integer timesteps"),
        (
            {"noise": torch.zeros(4, 2)},
            ValueError,
            r"x_start and noise must have the same shape, got \(4, 2, 4, 4\) and \(4, 2\)",
        ),
        ({"model": lambda x, t: x[:, :1]}, ValueError, r"model output has shape \(4, 1, 4, 4\), the 'eps' target"),
        ({"x_start": torch.zeros(4, dtype=torch.long)}, TypeError, r"x_start must be a floating tensor.*torch.int64"),
        ({"x_start": torch.zeros(4), "offset_noise": 0.1}, ValueError, r"offset_noise needs.*channel"),
    ],
)
def test_loss_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = bare(timesteps=100)
    args = {"model": lambda x, t: x, "x_start": torch.zeros(4, 2, 4, 4)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        denoising_with(model, args.pop("model")).diffusion_loss(args.pop("x_start"), **args)


# ----------------------------------------------------------------------------------- timesteps, noise, sampler
def test_generator_makes_timesteps_and_noise_reproducible() -> None:
    model = bare(timesteps=100)
    like = torch.zeros(5, 3, dtype=torch.bfloat16)

    def draw() -> tuple[Tensor, Tensor]:
        model.diffusion_generator = torch.Generator().manual_seed(7)
        return model.draw_timesteps(5), model.draw_noise(like)

    (t1, n1), (t2, n2) = draw(), draw()
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert t1.dtype == torch.long and ((t1 >= 0) & (t1 < 100)).all() and n1.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(7)
    assert torch.equal(t1, torch.randint(0, 100, (5,), generator=g))
    # noise is drawn in float32 then cast: the same numbers under every precision
    assert torch.equal(n1, torch.randn(5, 3, generator=g).to(torch.bfloat16))
    torch.manual_seed(0)
    full = model.draw_timesteps(4000)
    assert set(full.tolist()) == set(range(100))


class RecordingSampler:
    def __init__(self, weights: Tensor | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.weights = weights

    def sample(self, batch_size: int, num_timesteps: int, device: Any, generator: Any) -> Tensor:
        self.calls.append((batch_size, num_timesteps, device, generator))
        return torch.full((batch_size,), num_timesteps - 1, dtype=torch.long)

    def importance_weights(self, t: Tensor, num_timesteps: int) -> Tensor | None:
        return self.weights


def test_installed_sampler_draws_the_timesteps_and_its_importance_weights_apply() -> None:
    model = bare(timesteps=100)
    sampler = RecordingSampler()
    model.timestep_sampler = sampler
    model.diffusion_generator = gen = torch.Generator()
    assert torch.equal(model.draw_timesteps(3), torch.full((3,), 99))
    assert sampler.calls == [(3, 100, torch.device("cpu"), gen)]
    x0 = torch.randn(3, 2, 4, 4)
    plain = model.diffusion_loss(x0)
    per = model.last_timestep_losses[1]  # type: ignore[index]
    assert torch.equal(model.last_timestep_losses[0], torch.full((3,), 99))  # type: ignore[index]
    assert plain.item() == pytest.approx(per.mean().item(), rel=1e-6)
    sampler.weights = torch.tensor([2.0, 0.0, 1.0])
    model.diffusion_generator = torch.Generator().manual_seed(0)
    weighted = model.diffusion_loss(x0)
    per = model.last_timestep_losses[1]  # type: ignore[index]
    assert weighted.item() == pytest.approx(((per * sampler.weights).mean()).item(), rel=1e-6)
    # an explicit t bypasses the sampler, so no importance weights
    explicit = model.diffusion_loss(x0, t=torch.full((3,), 99))
    assert explicit.item() == pytest.approx(model.last_timestep_losses[1].mean().item(), rel=1e-6)  # type: ignore[index]


def test_a_bad_sampler_output_is_refused() -> None:
    model = bare(timesteps=100)

    class Bad:
        def sample(self, batch_size: int, num_timesteps: int, device: Any, generator: Any) -> Tensor:
            return torch.rand(batch_size)

    model.timestep_sampler = Bad()
    with pytest.raises(ValueError, match=r"timestep_sampler Bad.sample returned \(2,\); expected a LongTensor"):
        model.draw_timesteps(2)


def test_scheduled_sampler_from_the_package_plugs_in() -> None:
    from lightning_ldm.timestep_samplers import UniformSampler

    model = bare(timesteps=100)
    model.timestep_sampler = UniformSampler()
    model.diffusion_generator = torch.Generator().manual_seed(5)
    t = model.draw_timesteps(6)
    assert torch.equal(t, torch.randint(0, 100, (6,), generator=torch.Generator().manual_seed(5)))


# ------------------------------------------------------------------------------------------------- sampling
class CondModel(nn.Module):
    """out = 0.3·x + cond (cond broadcast); counts batch sizes, grad mode and training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        self.calls.append(
            {
                "batch": x.shape[0],
                "grad": torch.is_grad_enabled(),
                "training": self.training,
                "autocast": torch.is_autocast_enabled("cpu"),
                "dtype": x.dtype,
                "extra": None if extra is None else extra.shape[0],
            }
        )
        out = 0.3 * x
        if cond is not None:
            out = out + cond
        return out


@pytest.mark.parametrize("method", ["uniform", "trailing"])
def test_unguided_sampling_equals_the_core_sampler(method: str) -> None:
    model = bare(timesteps=100)
    net = CondModel()
    x_T = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    cond = torch.full((2, 2, 1, 1), 0.1)
    got = denoising_with(model, net).sample((2, 2, 3, 3), num_steps=10, method=method, cond=cond, x_T=x_T)
    expected = core_ddim_sample(
        lambda x, t: 0.3 * x + cond, x_T, model.alphas_cumprod, num_steps=10, method=method, parameterization="eps"
    )
    assert torch.equal(got, expected)  # type: ignore[arg-type]
    # guidance_scale=1 with an uncond: still one conditional forward per step, same result
    net.calls.clear()
    again = denoising_with(model, net).sample(
        (2, 2, 3, 3), num_steps=10, method=method, cond=cond, uncond=0 * cond, x_T=x_T
    )
    assert torch.equal(again, expected)  # type: ignore[arg-type]
    assert {c["batch"] for c in net.calls} == {2}


def test_classifier_free_guidance_combines_the_branches_each_step() -> None:
    model = bare(timesteps=100, parameterization="v")
    net = CondModel()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(3, 2, 3, 3, generator=g)
    cond = torch.randn(3, 2, 1, 1, generator=g)
    null = torch.zeros(1, 2, 1, 1)  # batch 1: broadcast over the batch
    extra = torch.zeros(3, 5)
    s = 4.0
    got, inter = denoising_with(model, net).sample(  # type: ignore[misc]
        (3, 2, 3, 3),
        num_steps=8,
        guidance_scale=s,
        cond={"cond": cond, "extra": extra},
        uncond={"cond": null, "extra": extra},
        x_T=x_T,
        return_intermediates=True,
    )

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_u, out_c = 0.3 * x + null, 0.3 * x + cond
        return out_u + s * (out_c - out_u)

    expected = core_ddim_sample(guided, x_T, model.alphas_cumprod, num_steps=8, parameterization="v")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert len(net.calls) == len(inter["x_inter"]) - 1 == 9  # "uniform": range(0, 100, 12) + 1, 9 steps
    assert {c["batch"] for c in net.calls} == {6} and {c["extra"] for c in net.calls} == {6}
    assert not torch.allclose(got, denoising_with(model, net).sample((3, 2, 3, 3), num_steps=8, cond=cond, x_T=x_T))  # type: ignore[arg-type]


def test_sampling_runs_in_eval_without_grad_and_restores_the_modes() -> None:
    model = bare(timesteps=50)
    net = CondModel()
    net.train()
    torch.manual_seed(0)
    a = denoising_with(model, net).sample(
        (2, 2, 3, 3), num_steps=5, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    b = denoising_with(model, net).sample(
        (2, 2, 3, 3), num_steps=5, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)  # type: ignore[arg-type]
    assert net.training and all(c["grad"] is False and c["training"] is False for c in net.calls)
    assert all(c["autocast"] is False and c["dtype"] == torch.float32 for c in net.calls)  # no Trainer: plain


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guidance_scale": 3.0, "cond": torch.zeros(2, 2, 1, 1)}, ValueError, r"guidance_scale=3 needs both cond"),
        ({"guidance_scale": 3.0, "uncond": torch.zeros(2, 2, 1, 1)}, ValueError, r"needs both cond and uncond"),
        (
            {"guidance_scale": 2.0, "cond": [1, 2], "uncond": [0, 0]},
            TypeError,
            r"^cond\[0\] and uncond\[0\] must be tensors .*got int and int",
        ),
        (
            {"guidance_scale": 2.0, "cond": {"cond": torch.zeros(2)}, "uncond": {"extra": torch.zeros(2)}},
            ValueError,
            r"^cond and uncond must name the same keys, got \['cond'\] and \['extra'\]",
        ),
        (
            {"guidance_scale": 2.0, "cond": torch.zeros(3, 2, 1, 1), "uncond": torch.zeros(2, 2, 1, 1)},
            ValueError,
            r"^cond must have batch size 2 \(or 1",
        ),
        (  # a CompVis-style dict of lists: the message follows the user's structure
            {"guidance_scale": 2.0, "cond": {"c": [torch.zeros(3)]}, "uncond": {"c": [torch.zeros(2)]}},
            ValueError,
            r"^cond\['c'\]\[0\] must have batch size 2 \(or 1",
        ),
        (
            {"guidance_scale": 1.0, "cond": {"c": [torch.zeros(3)]}},
            ValueError,
            r"^cond\['c'\]\[0\] must have batch size 2 \(or 1",
        ),
        ({"x_T": torch.zeros(1, 2, 3, 3)}, ValueError, r"x_T has shape \(1, 2, 3, 3\), expected shape \(2, 2, 3, 3\)"),
        ({"eta": -1.0}, ValueError, r"eta=-1 is out of range"),
        ({"method": "karras"}, ValueError, r"^method='karras' is not supported"),
        (  # sample()'s names, not make_ddim_timesteps' (ddim_discr_method, num_ddim_timesteps)
            {"num_steps": 30},
            ValueError,
            r"^method='uniform' with num_steps=30 and T=50 timesteps: .*arguments: 'quad', 'linspace', 'trailing'",
        ),
        ({"guidance_scale": float("nan")}, ValueError, r"guidance_scale=nan must be finite"),
    ],
)
def test_sampling_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = bare(timesteps=50)
    with pytest.raises(error, match=match):
        denoising_with(model, CondModel()).sample((2, 2, 3, 3), **{"num_steps": 5, **kwargs})


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_sampling_from_a_callback_runs_under_the_trainer_precision(precision: str) -> None:
    net = CondModel()
    results: list[Tensor] = []

    class SampleCallback(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            results.append(denoising_with(pl_module, net).sample((2, 2, 3, 3), num_steps=4))

    model = Toy()
    make_trainer(precision=precision, max_steps=1, callbacks=[SampleCallback()]).fit(model)
    autocast, dtype = {
        "bf16-mixed": (True, torch.float32),  # autocast on, the sample stays float32
        "bf16-true": (False, torch.bfloat16),  # the default dtype is bf16: x_T is drawn in it
        "32-true": (False, torch.float32),
    }[precision]
    assert results and net.calls and all(c["grad"] is False for c in net.calls)
    assert {c["autocast"] for c in net.calls} == {autocast} and {c["dtype"] for c in net.calls} == {dtype}
    assert results[0].dtype == dtype and torch.isfinite(results[0]).all()
    assert torch.get_default_dtype() == torch.float32


class ConvNet(nn.Module):
    """A convolution: its output changes under bf16 autocast (unlike CondModel's elementwise maths)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.conv(x)


def test_sample_precision_overrides_the_attached_trainer_s() -> None:
    model = Toy()
    make_trainer(precision="bf16-mixed", max_steps=1).fit(model)  # the Trainer stays attached, as after any fit
    model = denoising_with(model, ConvNet())
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))

    def run(**kwargs: Any) -> Tensor:
        out = model.sample(noise.shape, x_T=noise, num_steps=4, **kwargs)
        assert isinstance(out, Tensor) and out.dtype == torch.float32
        return out

    attached, as32 = run(), run(precision="32-true")
    assert not torch.equal(attached, as32)  # bf16 autocast under the Trainer's precision
    assert torch.equal(run(precision="bf16-mixed"), attached) and torch.equal(run(precision="bf16"), attached)
    assert torch.equal(run(precision=32), as32) and torch.equal(run(precision="32"), as32)
    model.trainer = None  # detached: float32 by default, and the named precision still applies
    assert torch.equal(run(), as32) and torch.equal(run(precision="bf16-mixed"), attached)
    with pytest.raises(
        ValueError, match=r"^precision='64-true' is not supported; expected one of '32-true', 'bf16-mixed', '16-mixed'"
    ):
        run(precision="64-true")


# --------------------------------------------------------------------------------- fingerprint and checkpoints
def fit_and_save(tmp_path: Any, **hparams: Any) -> tuple[Toy, str]:
    model = Toy(**hparams)
    trainer = make_trainer(max_steps=5)
    trainer.fit(model)
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return model, path


def test_tiny_training_runs_the_hooks_and_saves_the_fingerprint(tmp_path: Any) -> None:
    model = Toy(loss_weighting="min_snr")
    before = model.net.weight.detach().clone()
    trainer = make_trainer(max_steps=5)
    trainer.fit(model)
    assert trainer.global_step == 5
    assert not torch.equal(before, model.net.weight)
    t, per = model.last_timestep_losses  # type: ignore[misc]
    assert t.shape == per.shape == (4,) and torch.isfinite(per).all()
    path = tmp_path / "w.ckpt"
    trainer.save_checkpoint(path, weights_only=True)  # callbacks' hooks are skipped here; the module's run
    checkpoint = torch.load(path, weights_only=True)  # the fingerprint is plain data
    assert (
        checkpoint["lightning_ldm"]["schedule"]
        == model.noise_schedule.fingerprint
        == {
            "version": 1,
            "beta_schedule": "linear",
            "timesteps": 100,
            "linear_start": 1e-4,
            "linear_end": 2e-2,
            "zero_terminal_snr": False,
            "v_posterior": 0.0,
            "parameterization": "eps",
        }
    )
    loaded = Toy.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.net.weight, model.net.weight)
    assert loaded._trainer is None
    sample = loaded.sample((2, 2, 4, 4), num_steps=5)  # sampling without a Trainer
    assert sample.shape == (2, 2, 4, 4)  # type: ignore[union-attr]


def test_load_from_checkpoint_refuses_a_different_schedule(tmp_path: Any) -> None:
    _, path = fit_and_save(tmp_path)
    with pytest.raises(ValueError, match=r"different noise schedule.*\(timesteps: checkpoint 100, model 50\)") as info:
        Toy.load_from_checkpoint(path, timesteps=50)
    assert "linear_end" not in str(info.value) and "check_schedule_on_load = False" in str(info.value)
    with pytest.raises(
        ValueError,
        match=r"beta_schedule: checkpoint 'linear', model 'cosine'; cosine_s: checkpoint None, model 0.008; "
        r"linear_end: checkpoint 0.02, model None; linear_start: checkpoint 0.0001, model None",
    ):
        Toy.load_from_checkpoint(path, beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"parameterization: checkpoint 'eps', model 'v'"):
        Toy.load_from_checkpoint(path, parameterization="v")


def test_opting_out_loads_a_different_schedule(tmp_path: Any) -> None:
    _, path = fit_and_save(tmp_path)

    class Lenient(Toy):
        check_schedule_on_load = False

    model = Lenient.load_from_checkpoint(path, timesteps=50)
    assert model.num_timesteps == 50


def test_resuming_fit_with_a_different_schedule_is_refused(tmp_path: Any) -> None:
    _, path = fit_and_save(tmp_path)
    other = Toy(zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"zero_terminal_snr: checkpoint False, model True"):
        make_trainer(max_steps=6).fit(other, ckpt_path=path)
    same = Toy()
    trainer = make_trainer(max_steps=6)
    trainer.fit(same, ckpt_path=path)
    assert trainer.global_step == 6


def test_a_checkpoint_without_fingerprint_loads_with_a_warning(tmp_path: Any) -> None:
    model, path = fit_and_save(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["lightning_ldm"]
    torch.save(checkpoint, path)
    with pytest.warns(UserWarning, match=r"no lightning_ldm schedule fingerprint.*cannot check"):
        loaded = Toy.load_from_checkpoint(path)
    assert torch.equal(loaded.net.weight, model.net.weight)


def test_a_schedule_registered_after_loading_is_checked_then() -> None:
    source = Toy(timesteps=100)
    checkpoint: dict[str, Any] = {}
    source.on_save_checkpoint(checkpoint)

    class Late(DiffusionMixin, L.LightningModule):
        pass

    late = Late()
    late.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"timesteps: checkpoint 100, model 20"):
        late.register_schedule(timesteps=20)
    late.register_schedule(timesteps=100)
    assert late.noise_schedule.num_timesteps == 100  # type: ignore[union-attr]
    late.register_schedule(timesteps=20)  # once matched, re-registering is the user's business
    assert late.noise_schedule.num_timesteps == 20  # type: ignore[union-attr]


def test_fingerprint_floats_compare_with_tolerance_and_given_betas_by_hash() -> None:
    a, b = Toy(), Toy()
    b.register_schedule(timesteps=100, linear_end=0.02 * (1 + 1e-15))
    checkpoint: dict[str, Any] = {}
    a.on_save_checkpoint(checkpoint)
    b.on_load_checkpoint(checkpoint)  # equal up to float noise: accepted
    betas = ref_betas("linear", 100)
    a.register_schedule(given_betas=betas)
    b.register_schedule(given_betas=betas * 1.01)
    checkpoint = {}
    a.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"betas_sha256: checkpoint '[0-9a-f]{16}', model '[0-9a-f]{16}'"):
        b.on_load_checkpoint(checkpoint)
    assert math.isfinite(float(a.lvlb_weights.sum()))


# ----------------------------------------------------------------------------- checkpointing through the Trainer
class CheckpointedToy(Toy):
    """Toy whose hidden block runs through ``lightning_ldm.checkpoint``; records the gradients of the first step."""

    def __init__(self, use_checkpoint: bool = False, reentrant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(2, 8, 1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(), nn.Dropout(0.2), nn.Conv2d(8, 8, 1))
        self.out = nn.Conv2d(8, 2, 1)
        self.use_checkpoint = use_checkpoint
        self.checkpoint_use_reentrant = reentrant
        self.grads: dict[str, Tensor] = {}
        self.block_dtype: list[torch.dtype] = []
        self.block[0].register_forward_hook(lambda m, i, o: self.block_dtype.append(o.dtype))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.inp(x) + timestep_embedding(t, 8)[:, :, None, None]
        return self.out(
            checkpoint(self.block, (h,), (), self.use_checkpoint, use_reentrant=self.checkpoint_use_reentrant)
        )

    def on_train_start(self) -> None:
        self.diffusion_generator = torch.Generator().manual_seed(0)
        torch.manual_seed(1)  # dropout

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_gradients_equal_under_bf16_mixed(reentrant: bool) -> None:
    runs = []
    for flag in (False, True):
        model = CheckpointedToy(use_checkpoint=flag, reentrant=reentrant)
        make_trainer(precision="bf16-mixed", max_steps=1).fit(model)
        runs.append(model)
    plain, ckpt = runs
    # forward under autocast: bf16 activations; with checkpointing the recomputation in backward is bf16 too
    assert set(plain.block_dtype) == {torch.bfloat16} and len(plain.block_dtype) == 1
    assert set(ckpt.block_dtype) == {torch.bfloat16} and len(ckpt.block_dtype) == 2
    assert plain.grads.keys() == ckpt.grads.keys() and "block.0.weight" in plain.grads
    for name, grad in plain.grads.items():
        torch.testing.assert_close(ckpt.grads[name], grad, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------- README usage
def test_timestep_embedding_caches_per_exact_max_period() -> None:
    t = torch.tensor([0, 3, 7])
    first = timestep_embedding(t, 8, max_period=100.9)
    second = timestep_embedding(t, 8, max_period=100.2)
    assert torch.equal(first, compvis.timestep_embedding(t, 8, 100.9))
    assert torch.equal(second, compvis.timestep_embedding(t, 8, 100.2))
    with pytest.raises(ValueError, match=r"dim=0 is out of range; expected an integer >= 1"):
        timestep_embedding(t, 0)
    with pytest.raises(ValueError, match=r"max_period=-1 is out of range"):
        timestep_embedding(t, 8, max_period=-1)


def test_zero_terminal_snr_with_eps_warns_at_registration() -> None:
    with pytest.warns(UserWarning, match=r"zero_terminal_snr=True, parameterization='eps'.*parameterization='v'"):
        bare(timesteps=100, zero_terminal_snr=True, parameterization="eps")


# --------------------------------------------------- shapes are integers, never truncated (issue 13, point 7)
@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2.7, 2, 4, 4), r"shape\[0\] must be an integer, got 2.7 of type float"),
        ((2, 2, 4.9, 4), r"shape\[2\] must be an integer, got 4.9 of type float"),
        ((2, True, 4, 4), r"shape\[1\] must be an integer, got True of type bool"),
        ("2244", r"shape must be a sequence of positive integers, got str"),
    ],
)
def test_sample_refuses_a_shape_of_non_integers(shape: Any, match: str) -> None:
    model = Toy(timesteps=10)
    with pytest.raises(TypeError, match=match):
        model.sample(shape, num_steps=2)
    out = model.sample(torch.Size([2, 2, 4, 4]), num_steps=2)  # a torch.Size is a sequence of ints
    assert isinstance(out, Tensor) and out.shape == (2, 2, 4, 4)
