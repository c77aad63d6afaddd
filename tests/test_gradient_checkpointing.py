"""GradientCheckpointing survives ``copy.deepcopy`` and ``pickle`` of the module taken during fit."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_ldm.callbacks import DiffusionSeedCallback, GradientCheckpointing
from tests.lightning_helpers import TinyDenoiser, make_loader, make_trainer
from tests.test_latent import LDM, SEED, loader


class _CopyDuringFit(Callback):
    """At the first training batch end, deep-copies and pickles the module (and its checkpointed block)."""

    def __init__(self) -> None:
        self.copies: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.copies:
            return
        net = pl_module.net  # type: ignore[attr-defined]
        self.copies = {
            "wrapped_during_fit": "forward" in net.block.__dict__,
            "deepcopy_module": copy.deepcopy(pl_module),
            "deepcopy_net": copy.deepcopy(net),
            "pickle_net": pickle.loads(pickle.dumps(net)),
            "pickle_module": pickle.loads(pickle.dumps(pl_module)),
        }


def _block_input() -> Tensor:
    return torch.linspace(-3.0, 3.0, 4 * 32).reshape(4, 32)


def _grads(block: nn.Module, h: Tensor) -> tuple[Tensor, list[Tensor]]:
    block.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = block(h)
        (out.double() ** 2).sum().backward()
    return out.detach(), [p.grad.clone() for p in block.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_copies_taken_during_fit_run_their_own_weights(use_reentrant: bool) -> None:
    model = TinyDenoiser(timesteps=20)
    spy = _CopyDuringFit()
    gc = GradientCheckpointing(["net.block"], use_reentrant=use_reentrant)
    make_trainer(max_steps=2, callbacks=[gc, spy]).fit(model, make_loader())
    assert spy.copies["wrapped_during_fit"] is True
    assert "forward" not in model.net.block.__dict__  # the original is put back at fit end
    h = _block_input()
    reference_out, reference_grads = _grads(model.net.block, h)  # the original, unwrapped block
    for key in ("deepcopy_module", "deepcopy_net", "pickle_net", "pickle_module"):
        copied = spy.copies[key]
        block = copied.net.block if isinstance(copied, L.LightningModule) else copied.block
        # the copy is still checkpointed, and its wrapper points at the copy, not at the original module
        wrapper = block.__dict__["forward"]
        assert wrapper.module is block and wrapper.use_reentrant is use_reentrant, key
        # same weights (taken one step before the end) run the copy's own parameters: recompute under a checkpoint
        with torch.no_grad():
            for p_copy, p in zip(block.parameters(), model.net.block.parameters(), strict=True):
                p_copy.copy_(p)
        out, grads = _grads(block, h)
        assert torch.equal(out, reference_out), key
        assert all(torch.equal(g, r) for g, r in zip(grads, reference_grads, strict=True)), key
        # the original's gradients (from the reference run) are untouched by the copy's backward
        assert all(
            torch.equal(p.grad, r) for p, r in zip(model.net.block.parameters(), reference_grads, strict=True)
        ), key
        # zeroing the copy's weights changes the copy's output (SiLU(Linear0(·)) = 0) and nothing of the original
        with torch.no_grad():
            for p in block.parameters():
                p.zero_()
        zero_out, zero_grads = _grads(block, h)
        assert torch.equal(zero_out, torch.zeros_like(zero_out)), key
        assert all(torch.equal(g, torch.zeros_like(g)) for g in zero_grads), key
        assert torch.equal(_grads(model.net.block, h)[0], reference_out), key


def test_wrapper_uses_the_checkpoint_when_grad_is_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    # a pickled copy recomputes its forward in backward (it is checkpointed), an unwrapped block does not
    model = TinyDenoiser(timesteps=20)
    spy = _CopyDuringFit()
    make_trainer(max_steps=1, callbacks=[GradientCheckpointing(["net.block"]), spy]).fit(model, make_loader())
    block = spy.copies["pickle_net"].block
    calls: list[bool] = []
    inner = block[1]
    inner.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    _grads(block, _block_input())
    assert calls == [True, True]  # forward, then the recomputation in backward
    calls.clear()
    with torch.no_grad():
        block(_block_input())
    assert calls == [False]  # no checkpoint without grad


class _OwnForward(nn.Module):
    """A module whose instance already carries its own ``forward`` (a picklable bound method of a helper)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = _Scale(2.0)
        self.forward = self.scale.apply  # type: ignore[method-assign]


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def apply(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x * self.factor


class _OwnForwardModel(TinyDenoiser):
    def __init__(self) -> None:
        super().__init__(timesteps=20)
        self.extra = _OwnForward()


def test_instance_forward_is_wrapped_copied_and_restored() -> None:
    model = _OwnForwardModel()
    before = model.extra.__dict__["forward"]
    copies: list[nn.Module] = []

    class Grab(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            copies.append(pickle.loads(pickle.dumps(model.extra)))

    make_trainer(max_steps=1, callbacks=[GradientCheckpointing(["extra"]), Grab()]).fit(model, make_loader())
    assert model.extra.__dict__["forward"] is before  # the instance's own forward is put back
    x = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    out = copies[0](x)
    assert torch.equal(out, x * 2.0)
    assert out.requires_grad


class _GradsLDM(LDM):
    """The cross-attention LDM of ``test_latent``; keeps every parameter's gradient of the first step."""

    def on_after_backward(self) -> None:
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_the_conditioner_gets_its_gradient_through_the_checkpointed_denoiser(use_reentrant: bool) -> None:
    """Issue 13.3: apply_model passes ``context=`` by keyword; the module that produced it (``class_embed``) gets the
    gradient it gets without checkpointing, with either engine."""

    def first_step_grads(callbacks: list[Callback]) -> dict[str, Tensor]:
        model = _GradsLDM()
        make_trainer(max_steps=1, callbacks=[DiffusionSeedCallback(seed=SEED), *callbacks]).fit(model, loader())
        return model.grads

    reference = first_step_grads([])
    gc = GradientCheckpointing(["model"], use_reentrant=use_reentrant)
    got = first_step_grads([gc])
    assert "class_embed.weight" in reference and float(reference["class_embed.weight"].abs().sum()) > 0
    assert sorted(got) == sorted(reference)  # no parameter is left without a gradient
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)
