"""ScheduleCallback, GradientCheckpointing and AlphaBlenderMonitor on a tiny DiffusionMixin model (CPU, few steps)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_ldm.callbacks import (
    AlphaBlenderMonitor,
    DiffusionSeedCallback,
    GradientCheckpointing,
    ScheduleCallback,
    TimestepLossMonitor,
)
from lightning_ldm.callbacks.diffusion_seed import DEFAULT_SEED
from lightning_ldm.compat import CompVisCompat
from lightning_ldm.mixin import DiffusionMixin
from lightning_ldm.seeding import derive_seed
from lightning_ldm.timestep_samplers import LogitNormalSampler, LossAwareSampler, UniformSampler
from tests.lightning_helpers import RecordingLogger, TinyDenoiser, make_loader, make_trainer

T = 20
B = 8


def _linear_log_snr(n_steps: int, start: float = 1e-4, end: float = 2e-2) -> np.ndarray:
    betas = np.linspace(start**0.5, end**0.5, n_steps) ** 2
    abar = np.cumprod(1 - betas)
    return np.log(abar / (1 - abar))


# ====================================================================================== DiffusionSeedCallback
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": -1}, ValueError, "seed=-1 is out of range"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        (
            {"timestep_sampler": "bogus"},
            ValueError,
            "timestep_sampler='bogus' is not supported; expected one of 'uniform', 'loss_aware'",
        ),
        (
            {"timestep_sampler": 3},
            TypeError,
            r"timestep_sampler must be one of 'uniform', 'loss_aware', 'logit_normal' or a TimestepSampler instance, "
            r"got 3 of type int \(the seed is the second argument: pass seed=...\)",
        ),
        ({"timestep_sampler": None}, TypeError, "timestep_sampler must be one of .* got None of type NoneType$"),
        # the signature is explicit (LightningCLI shows it): the former options are plain unknown keywords now
        ({"num_buckets": 5}, TypeError, r"unexpected keyword argument 'num_buckets'"),
        ({"logit_normal_std": 2.0}, TypeError, r"unexpected keyword argument 'logit_normal_std'"),
    ],
)
def test_seed_callback_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DiffusionSeedCallback(**kwargs)


def test_seed_callback_builds_default_samplers_from_names() -> None:
    assert isinstance(DiffusionSeedCallback().sampler, UniformSampler)
    aware = DiffusionSeedCallback("loss_aware").sampler
    assert isinstance(aware, LossAwareSampler) and (aware.history_per_term, aware.uniform_prob) == (10, 0.001)
    normal = DiffusionSeedCallback(timestep_sampler="logit_normal").sampler
    assert isinstance(normal, LogitNormalSampler) and (normal.mean, normal.std) == (0.0, 1.0)
    mine = LogitNormalSampler(mean=0.5)
    cb = DiffusionSeedCallback(mine, 7)
    assert cb.sampler is mine and cb.seed == 7


def test_schedule_callback_is_a_deprecated_alias() -> None:
    mine = LossAwareSampler()
    with pytest.warns(DeprecationWarning, match=r"ScheduleCallback is renamed DiffusionSeedCallback \(its sampler="):
        old = ScheduleCallback(sampler=mine, seed=3)
    assert isinstance(old, DiffusionSeedCallback) and old.sampler is mine and old.seed == 3


def test_seed_callback_signature_is_explicit() -> None:
    import inspect

    for cls in (DiffusionSeedCallback, ScheduleCallback):
        kinds = {p.kind for p in inspect.signature(cls.__init__).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds


class _Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _NoSchedule(DiffusionMixin, _Plain):
    pass


@pytest.mark.parametrize("callback", [ScheduleCallback, TimestepLossMonitor])
def test_refuses_a_module_without_the_mixin(callback: type) -> None:
    with pytest.raises(
        TypeError, match=rf"{callback.__name__} needs a LightningModule that mixes in DiffusionMixin.*got _Plain"
    ):
        make_trainer(callbacks=[callback()]).fit(_Plain(), make_loader())


@pytest.mark.parametrize("callback", [ScheduleCallback, TimestepLossMonitor])
def test_refuses_a_module_without_a_schedule(callback: type) -> None:
    with pytest.raises(
        RuntimeError,
        match=rf"_NoSchedule has no noise schedule; call self.register_schedule.* fitting with {callback.__name__}$",
    ):
        make_trainer(callbacks=[callback()]).fit(_NoSchedule(), make_loader())


class _Snoop(CompVisCompat, TinyDenoiser):
    """Records what the callback installed, and the table dtypes (CompVis' names), at every training step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[Any, Any, torch.dtype]] = []
        self.val_t: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append((self.timestep_sampler, self.diffusion_generator, self.sqrt_one_minus_alphas_cumprod.dtype))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        t = self.draw_timesteps(batch[0].shape[0])
        self.val_t.append(t.clone())
        return self.diffusion_loss(batch[0], t=t)


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal"])
def test_draws_follow_seed_rank_and_batch_counter(sampler: str) -> None:
    model = _Snoop(timesteps=T)
    cb = DiffusionSeedCallback(seed=11, timestep_sampler=sampler)
    make_trainer(max_steps=5, callbacks=[cb]).fit(model, make_loader())
    assert cb.batch_counter == 5
    for i, (t, _) in enumerate(model.recorded):
        expected = cb.sampler.sample(B, T, "cpu", torch.Generator().manual_seed(derive_seed(11, 0, 0, i)))
        assert torch.equal(t, expected), i
    installed, generator, _ = model.seen[0]
    assert installed is cb.sampler and isinstance(generator, torch.Generator)
    # put back after fit
    assert model.timestep_sampler is None and model.diffusion_generator is None


def test_same_seed_same_run_other_seed_other_run() -> None:
    def run(seed: int) -> tuple[TinyDenoiser, list[Tensor]]:
        model = TinyDenoiser(timesteps=T)
        make_trainer(max_steps=3, callbacks=[DiffusionSeedCallback(seed=seed)]).fit(model, make_loader())
        return model, [t for t, _ in model.recorded]

    a, ta = run(5)
    b, tb = run(5)
    c, tc = run(6)
    assert all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(ta, tc, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_seed_none_takes_pl_global_seed_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "77")
    cb = DiffusionSeedCallback()
    model = TinyDenoiser(timesteps=T)
    make_trainer(max_steps=1, callbacks=[cb]).fit(model, make_loader())
    assert cb.resolved_seed == 77
    assert torch.equal(
        model.recorded[0][0],
        torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(derive_seed(77, 0, 0, 0))),
    )
    monkeypatch.delenv("PL_GLOBAL_SEED")
    cb = DiffusionSeedCallback()
    make_trainer(max_steps=1, callbacks=[cb]).fit(TinyDenoiser(timesteps=T), make_loader())
    assert cb.resolved_seed == DEFAULT_SEED == 0


def test_validation_draws_repeat_every_epoch_and_tables_stay_float32_under_bf16_true() -> None:
    model = _Snoop(timesteps=T)
    trainer = make_trainer(max_epochs=2, max_steps=-1, precision="bf16-true", callbacks=[DiffusionSeedCallback(seed=2)])
    trainer.fit(model, make_loader(n=16), make_loader(n=16))
    assert len(model.val_t) == 4  # 2 batches × 2 epochs
    assert torch.equal(model.val_t[0], model.val_t[2]) and torch.equal(model.val_t[1], model.val_t[3])
    assert not torch.equal(model.val_t[0], model.val_t[1])
    assert {dtype for _, _, dtype in model.seen} == {torch.float32}
    assert model.net.inp.weight.dtype == torch.bfloat16


def test_loss_aware_sampler_is_fed_every_batch() -> None:
    model = TinyDenoiser(timesteps=T)
    cb = DiffusionSeedCallback(LossAwareSampler(history_per_term=2), seed=0)
    make_trainer(max_steps=8, callbacks=[cb]).fit(model, make_loader())
    reference = LossAwareSampler(history_per_term=2)
    reference.prepare(T)
    for t, losses in model.recorded:
        reference.update(t, losses)
    state, expected = cb.sampler.state_dict(), reference.state_dict()
    assert torch.equal(state["loss_history"], expected["loss_history"])
    assert torch.equal(state["loss_counts"], expected["loss_counts"])
    assert int(state["loss_counts"].sum()) > 0


def test_state_dict_round_trip_and_seed_adoption() -> None:
    cb = DiffusionSeedCallback(LossAwareSampler(history_per_term=1), seed=4)
    make_trainer(max_steps=3, callbacks=[cb]).fit(TinyDenoiser(timesteps=T), make_loader())
    state = cb.state_dict()
    assert sorted(state) == ["batch_counter", "sampler", "sampler_type", "seed"]
    assert state["batch_counter"] == 3 and state["seed"] == 4 and state["sampler_type"] == "LossAwareSampler"
    assert int(state["sampler"]["loss_counts"].sum()) > 0
    fresh = DiffusionSeedCallback(LossAwareSampler(history_per_term=1))  # seed=None adopts the saved seed
    fresh.load_state_dict(state)
    assert fresh.batch_counter == 3 and fresh.resolved_seed == 4
    assert torch.equal(fresh.sampler.state_dict()["loss_history"], state["sampler"]["loss_history"])
    with pytest.warns(UserWarning, match=r"DiffusionSeedCallback\(seed=9\) resumes a run that used seed 4"):
        DiffusionSeedCallback(LossAwareSampler(history_per_term=1), seed=9).load_state_dict(state)
    with pytest.warns(UserWarning, match="timestep sampler was LossAwareSampler, this run uses UniformSampler"):
        DiffusionSeedCallback(seed=4).load_state_dict(state)
    with pytest.raises(KeyError, match="has no 'batch_counter'"):
        DiffusionSeedCallback().load_state_dict({"seed": 1})


class _Boom(Callback):
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 1:
            raise RuntimeError("boom")


def test_module_put_back_when_fit_raises() -> None:
    model = TinyDenoiser(timesteps=T)
    gc = GradientCheckpointing(["net.block"])
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(callbacks=[DiffusionSeedCallback(), gc, _Boom()]).fit(model, make_loader())
    assert model.timestep_sampler is None and model.diffusion_generator is None
    assert "forward" not in model.net.block.__dict__


# ====================================================================================== GradientCheckpointing
@pytest.mark.parametrize(
    ("modules", "error", "match"),
    [
        ([], ValueError, "modules is empty"),
        ("net.block", TypeError, "modules must be a sequence"),
        (nn.Linear, TypeError, "modules must be a sequence"),
        ([""], ValueError, "modules holds an empty string"),
        ([3], TypeError, "modules holds 3 of type int; expected nn.Module subclasses"),
        ([int], TypeError, "modules holds <class 'int'> of type type"),
    ],
)
def test_gradient_checkpointing_bad_arguments(modules: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GradientCheckpointing(modules)


def test_gradient_checkpointing_bad_use_reentrant() -> None:
    with pytest.raises(TypeError, match="use_reentrant must be a bool"):
        GradientCheckpointing(["x"], use_reentrant="no")  # type: ignore[arg-type]


def test_gradient_checkpointing_accepts_a_numpy_bool() -> None:
    callback = GradientCheckpointing(["x"], use_reentrant=np.True_)  # type: ignore[arg-type]
    assert callback.use_reentrant is True


def test_gradient_checkpointing_refuses_fsdp_and_reentrant_with_unused_parameters() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(ValueError, match=r"does not stack on FSDP.*activation_checkpointing_policy"):
        GradientCheckpointing([nn.Linear]).setup(SimpleNamespace(strategy=FSDPStrategy()), TinyDenoiser(), "fit")  # type: ignore[arg-type]
    ddp = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    with pytest.raises(ValueError, match=r"use_reentrant=True\) fails under DDP with find_unused_parameters=True"):
        GradientCheckpointing([nn.Linear], use_reentrant=True).setup(ddp, TinyDenoiser(), "fit")  # type: ignore[arg-type]
    GradientCheckpointing([nn.Linear]).setup(ddp, TinyDenoiser(), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("modules", "match"),
    [
        (["net.nothing*"], r"net.nothing\* matched no submodule of TinyDenoiser; its submodules are: net, net.inp"),
        ([nn.Conv2d], "Conv2d matched no submodule"),
    ],
)
def test_gradient_checkpointing_unmatched_spec(modules: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_trainer(callbacks=[GradientCheckpointing(modules)]).fit(TinyDenoiser(), make_loader())


def test_gradient_checkpointing_selects_outermost_matches() -> None:
    gc = GradientCheckpointing([nn.Linear, "net.block", "net.block.*"])
    assert [name for name, _ in gc._select(TinyDenoiser())] == ["net.inp", "net.block", "net.out"]


class _Probe(nn.Module):
    """A Linear that records (autocast on, autocast dtype, output dtype) at every call."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        self.calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out


class _NoAutocastCheckpoint(torch.autograd.Function):
    """The CompVis checkpoint: recompute in backward with no autocast state carried (the defect, as a reference)."""

    @staticmethod
    def forward(ctx: Any, run: nn.Module, x: Tensor, *params: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        params = list(ctx.run.parameters())
        with torch.enable_grad():
            out = ctx.run(x)
        grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
        return (None, *grads)


class _NaiveCheckpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return _NoAutocastCheckpoint.apply(self.inner, x, *self.inner.parameters())


class _GradCapture(TinyDenoiser):
    def __init__(self, naive_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net.block[1] = _Probe(self.net.block[1])
        self.probe = self.net.block[1]
        self.grads: list[Tensor] = []
        if naive_checkpoint:
            self.net.block = _NaiveCheckpointed(self.net.block)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads = [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]


def _one_step_grads(precision: str, callbacks: list, accelerator: str = "cpu", **model_kwargs: Any) -> _GradCapture:
    model = _GradCapture(**model_kwargs)
    trainer = make_trainer(
        max_steps=1, precision=precision, accelerator=accelerator, callbacks=[DiffusionSeedCallback(seed=3), *callbacks]
    )
    trainer.fit(model, make_loader())
    return model


def _max_grad_diff(a: _GradCapture, b: _GradCapture) -> float:
    """Largest |difference| of any gradient entry, relative to the largest |gradient| of ``a``."""
    assert len(a.grads) == len(b.grads) == len(list(a.parameters()))
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.grads, b.grads, strict=True))
    return diff / max(float(x.float().abs().max()) for x in a.grads)


def test_checkpointed_gradients_equal_under_bf16_mixed_automatic_optimization() -> None:
    plain = _one_step_grads("bf16-mixed", [])
    gc = GradientCheckpointing(["net.block"])
    ckpt = _one_step_grads("bf16-mixed", [gc])
    naive = _one_step_grads("bf16-mixed", [], naive_checkpoint=True)
    probe_plain, probe_ckpt = plain.probe, ckpt.probe
    assert probe_plain.calls == [(True, torch.bfloat16, torch.bfloat16)]
    # forward + recomputation in backward; the recomputation ran under the Trainer's bf16 autocast
    assert probe_ckpt.calls == [(True, torch.bfloat16, torch.bfloat16)] * 2
    assert naive.probe.calls[1] == (False, torch.bfloat16, torch.float32)  # the defect recomputes in float32
    diff = _max_grad_diff(plain, ckpt)
    reference = _max_grad_diff(plain, naive)
    print(f"bf16-mixed relative max |grad diff|: checkpointed {diff:.3g}, without autocast {reference:.3g}")
    assert diff == 0.0
    assert reference > 1e-4  # measured 1.1e-3 relative
    # left as it was after fit
    assert "forward" not in ckpt.net.block.__dict__ and gc.checkpointed_names == []


def test_checkpointed_gradients_equal_in_float32() -> None:
    plain = _one_step_grads("32-true", [])
    ckpt = _one_step_grads("32-true", [GradientCheckpointing([nn.Sequential])])
    assert len(ckpt.probe.calls) == 2
    assert _max_grad_diff(plain, ckpt) == 0.0


def test_reentrant_checkpoint_gradients_equal_under_bf16_mixed() -> None:
    plain = _one_step_grads("bf16-mixed", [])
    ckpt = _one_step_grads("bf16-mixed", [GradientCheckpointing(["net.block"], use_reentrant=True)])
    assert ckpt.probe.calls == [(True, torch.bfloat16, torch.bfloat16)] * 2
    diff = _max_grad_diff(plain, ckpt)
    print(f"bf16-mixed relative max |grad diff|, reentrant lightning_ldm.checkpoint: {diff:.3g}")
    assert diff == 0.0


class _KwargBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        self.calls += 1
        return self.lin(x).tanh() * scale


def test_wrapped_forward_passes_keyword_arguments_and_is_undone() -> None:
    outer = nn.Sequential()
    outer.add_module("block", _KwargBlock())
    block = outer.block
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    block(x, scale=2.0).sum().backward()
    expected = block.lin.weight.grad.clone()
    block.lin.weight.grad = None
    gc = GradientCheckpointing(["block"])
    gc.on_fit_start(None, outer)  # type: ignore[arg-type]
    assert gc.checkpointed_names == ["block"] and "forward" in block.__dict__
    block.calls = 0
    block(x, scale=2.0).sum().backward()
    assert block.calls == 2  # forward + recomputation
    assert torch.equal(block.lin.weight.grad, expected)
    with torch.no_grad():  # no checkpoint (and no recomputation) without grad
        block.calls = 0
        block(x, scale=2.0)
        assert block.calls == 1
    gc.on_fit_end(None, outer)  # type: ignore[arg-type]
    assert "forward" not in block.__dict__ and gc.checkpointed_names == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpointed_gradients_equal_under_16_mixed_cuda() -> None:
    plain = _one_step_grads("16-mixed", [], accelerator="cuda")
    ckpt = _one_step_grads("16-mixed", [GradientCheckpointing(["net.block"])], accelerator="cuda")
    assert [c[2] for c in ckpt.probe.calls] == [torch.float16] * 2
    diff = _max_grad_diff(plain, ckpt)
    print(f"16-mixed (CUDA, GradScaler) max |grad diff| checkpointed vs not: {diff:.3g}")
    assert diff <= 1e-6


class _SeedStyleBlock(nn.Module):
    """A block with CompVis' ``use_checkpoint`` switch (uses torch's checkpoint when on)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_checkpoint = False
        self.lin = nn.Linear(32, 32)
        self.flags: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.flags.append(self.use_checkpoint)
        if self.use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self.lin, x, use_reentrant=False)
        return self.lin(x)


class _SeedStyle(TinyDenoiser):
    def __init__(self) -> None:
        super().__init__()
        self.net.block = _SeedStyleBlock()


def test_use_checkpoint_attribute_is_toggled_for_fit_only() -> None:
    model = _SeedStyle()
    gc = GradientCheckpointing([_SeedStyleBlock])
    make_trainer(max_steps=2, callbacks=[gc]).fit(model, make_loader())
    assert model.net.block.flags == [True, True]
    assert model.net.block.use_checkpoint is False
    assert "forward" not in model.net.block.__dict__


# ======================================================================================== AlphaBlenderMonitor
def test_alpha_blender_monitor_bad_arguments() -> None:
    with pytest.raises(ValueError, match="logging_interval='batch' is not supported; expected one of 'step', 'epoch'"):
        AlphaBlenderMonitor(logging_interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every_n_steps=0 is out of range"):
        AlphaBlenderMonitor(log_every_n_steps=0)


class _Blended(TinyDenoiser):
    def __init__(self) -> None:
        from lightning_ldm.blending import AlphaBlender

        super().__init__()
        self.fixed = AlphaBlender(0.3, merge_strategy="fixed")
        self.learned = AlphaBlender(0.5, merge_strategy="learned")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        mixed = self.learned(self.fixed(x, 2 * x), -x)
        return super().training_step((mixed,), batch_idx)


def test_alpha_blender_monitor_logs_alpha_by_name() -> None:
    logger = RecordingLogger()
    model = _Blended()
    mon = AlphaBlenderMonitor(log_every_n_steps=2)
    make_trainer(max_steps=4, logger=logger, callbacks=[mon]).fit(model, make_loader())
    fixed, learned = logger.series("alpha/fixed"), logger.series("alpha/learned")
    assert [s for s, _ in fixed] == [0, 2, 4] and [s for s, _ in learned] == [0, 2, 4]
    assert all(v == pytest.approx(0.3, abs=1e-7) for _, v in fixed)
    assert learned[0][1] == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-7)
    final = float(model.learned.mix_factor.detach().reshape(-1)[0])
    assert learned[-1][1] == pytest.approx(1 / (1 + math.exp(-final)), abs=1e-6)
    assert learned[-1][1] != learned[0][1]  # α is learned


def test_alpha_blender_monitor_epoch_interval_and_no_blender_warning() -> None:
    logger = RecordingLogger()
    make_trainer(max_epochs=2, max_steps=-1, logger=logger, callbacks=[AlphaBlenderMonitor("epoch")]).fit(
        _Blended(), make_loader()
    )
    assert [s for s, _ in logger.series("alpha/fixed")] == [4, 8]
    with pytest.warns(UserWarning, match="AlphaBlenderMonitor found no AlphaBlender in TinyDenoiser"):
        make_trainer(max_steps=1, callbacks=[AlphaBlenderMonitor()]).fit(TinyDenoiser(), make_loader())


def test_gather_of_uneven_rank_losses_keeps_rank_order() -> None:
    from lightning_ldm.callbacks._diffusion import gather_ranked

    # what "rank 1" sends: its size and its t, then its size and its losses
    other = [torch.tensor([3]), torch.tensor([7, 8, 9]), torch.tensor([3]), torch.tensor([0.7, 0.8, 0.9])]

    class _TwoRanks:
        def all_gather(self, x: Tensor) -> Tensor:
            return torch.stack([x, other.pop(0).to(x.dtype)])

    trainer = SimpleNamespace(world_size=2, strategy=_TwoRanks())
    t, losses = gather_ranked(trainer, torch.tensor([1, 2]), torch.tensor([0.1, 0.2]))  # type: ignore[arg-type]
    assert t.tolist() == [1, 2, 7, 8, 9]
    assert losses.tolist() == pytest.approx([0.1, 0.2, 0.7, 0.8, 0.9])
