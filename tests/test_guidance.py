"""Classifier-free guidance (guided_model) and eval_mode."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_ldm.guidance import eval_mode, guided_model

B = 3


class Spy:
    """``model(x, t, **kwargs)`` that records its calls; returns ``x·(1 + t)`` plus each batch-sized kwarg summed."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.calls: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
        self.dtype = dtype

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.calls.append((x, t, kwargs))
        out = x * (1 + t.to(x.dtype))[:, None]
        for value in kwargs.values():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == x.shape[0]:
                out = out + value.reshape(value.shape[0], -1).sum(dim=1, keepdim=True).to(x.dtype)
        return out if self.dtype is None else out.to(self.dtype)


def inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, generator=g), torch.tensor([0, 5, 9])


def test_scale_one_runs_only_the_conditional_branch() -> None:
    model = Spy()
    x, t = inputs()
    cond = torch.randn(B, 2)
    fn = guided_model(model, B, guidance_scale=1.0, cond=cond, uncond=torch.zeros(B, 2), model_kwargs={"k": 1})
    out = fn(x, t)
    assert len(model.calls) == 1
    seen_x, seen_t, kwargs = model.calls[0]
    assert seen_x is x and seen_t is t and kwargs["cond"] is cond and kwargs["k"] == 1
    assert torch.equal(out, model(x, t, cond=cond))
    assert guided_model(model, B)(x, t).shape == (B, 4)  # unconditional, unguided: no cond needed


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.5, -1.0])
def test_guidance_runs_one_batch_of_2b_and_combines_in_float32(scale: float) -> None:
    model = Spy(dtype=torch.bfloat16)
    x, t = inputs()
    cond, uncond = torch.randn(B, 2), torch.randn(B, 2)
    out = guided_model(model, B, guidance_scale=scale, cond=cond, uncond=uncond)(x, t)
    assert len(model.calls) == 1
    seen_x, seen_t, kwargs = model.calls[0]
    assert torch.equal(seen_x, torch.cat([x, x])) and torch.equal(seen_t, torch.cat([t, t]))
    assert torch.equal(kwargs["cond"], torch.cat([uncond, cond]))  # uncond first
    out_u = model(x, t, cond=uncond).float()
    out_c = model(x, t, cond=cond).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, out_u + scale * (out_c - out_u))
    if scale == 0.0:
        assert torch.equal(out, out_u)


def test_batch_one_conditioning_is_broadcast_and_batch_b_kwargs_repeated() -> None:
    model = Spy()
    x, t = inputs()
    cond, uncond = torch.randn(1, 2, 5), torch.zeros(1, 2, 5)  # e.g. one prompt embedding for every sample
    per_sample = torch.randn(B, 6)
    shared = torch.randn(7, 6)  # not batch-sized: passed as it is
    scalar = torch.tensor(2.0)
    fn = guided_model(
        model,
        B,
        guidance_scale=3.0,
        cond={"context": cond},
        uncond={"context": uncond},
        model_kwargs={"mask": per_sample, "table": shared, "scale": scalar, "flag": "x"},
    )
    fn(x, t)
    kwargs = model.calls[0][2]
    assert set(kwargs) == {"context", "mask", "table", "scale", "flag"}
    assert kwargs["context"].shape == (2 * B, 2, 5)
    assert torch.equal(kwargs["context"], torch.cat([uncond.expand(B, 2, 5), cond.expand(B, 2, 5)]))
    assert torch.equal(kwargs["mask"], torch.cat([per_sample, per_sample]))
    assert kwargs["table"] is shared and kwargs["scale"] is scalar and kwargs["flag"] == "x"


def test_mapping_conditioning_is_merged_into_the_keywords() -> None:
    model = Spy()
    x, t = inputs()
    c_ctx, c_y = torch.randn(B, 3), torch.randn(B, 1)
    u_ctx, u_y = torch.zeros(B, 3), torch.zeros(B, 1)
    out = guided_model(
        model, B, guidance_scale=2.0, cond={"context": c_ctx, "y": c_y}, uncond={"context": u_ctx, "y": u_y}
    )(x, t)
    kwargs = model.calls[0][2]
    assert torch.equal(kwargs["context"], torch.cat([u_ctx, c_ctx])) and torch.equal(kwargs["y"], torch.cat([u_y, c_y]))
    out_u, out_c = model(x, t, context=u_ctx, y=u_y), model(x, t, context=c_ctx, y=c_y)
    assert torch.equal(out, out_u + 2.0 * (out_c - out_u))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guidance_scale": 2.0, "cond": torch.ones(B, 2)}, ValueError, r"guidance_scale=2 needs both cond and uncond"),
        ({"guidance_scale": 2.0, "uncond": torch.ones(B, 2)}, ValueError, r"needs both cond and uncond"),
        (
            {"cond": [1, 2]},
            TypeError,
            r"cond must be a Tensor \(passed as model\(\.\.\., cond=\.\.\.\)\), a mapping .*list",
        ),
        ({"guidance_scale": 2.0, "cond": torch.ones(B), "uncond": 0}, TypeError, r"uncond must be a Tensor .* got int"),
        (
            {"guidance_scale": 2.0, "cond": {"context": torch.ones(B)}, "uncond": {"c": torch.ones(B)}},
            ValueError,
            r"cond and uncond must name the same keywords, got \['context'\] and \['c'\]",
        ),
        (  # nested dicts (CompVis' c_concat/c_crossattn) that name different keys
            {
                "guidance_scale": 2.0,
                "cond": {"cond": {"c_concat": [torch.ones(B)], "c_crossattn": [torch.ones(B)]}},
                "uncond": {"cond": {"c_crossattn": [torch.ones(B)]}},
            },
            ValueError,
            r"cond\['cond'\] and uncond\['cond'\] must name the same keys, got \['c_concat', 'c_crossattn'\] and "
            r"\['c_crossattn'\]",
        ),
        (
            {"guidance_scale": 2.0, "cond": {"context": "a cat"}, "uncond": {"context": ""}},
            TypeError,
            r"cond\['context'\] and uncond\['context'\] must be tensors.* to batch them, got str and str",
        ),
        (
            {"guidance_scale": 2.0, "cond": torch.ones(2, 4), "uncond": torch.ones(B, 4)},
            ValueError,
            r"^cond must have batch size 3 \(or 1, broadcast over the batch\), got shape \(2, 4\)",
        ),
        (
            {"guidance_scale": 2.0, "cond": torch.ones(B, 4), "uncond": torch.tensor(0.0)},
            ValueError,
            r"^uncond must have batch size 3 .* got shape \(\)",
        ),
        ({"guidance_scale": "7.5"}, TypeError, r"guidance_scale must be a real number, got '7.5' of type str"),
        ({"guidance_scale": float("nan")}, ValueError, r"guidance_scale=nan must be finite"),
    ],
)
def test_guided_model_refuses_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = Spy()
    with pytest.raises(error, match=match):
        guided_model(model, B, **kwargs)
    assert model.calls == []


# --------------------------------------------------------------------------------------------------- eval_mode
def test_eval_mode_restores_every_submodule_mode() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.1)))
    net.train()
    net[1].eval()  # a mixed state: one submodule was frozen by the user
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before  # restored on errors too


def test_eval_mode_accepts_plain_callables() -> None:
    def fn(x: Tensor) -> Tensor:
        return x

    with eval_mode(fn):
        assert torch.equal(fn(torch.ones(1)), torch.ones(1))


# ------------------------------------------------- batch-1 conditions: one rule at every scale (issue 13, point 6)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_batch_one_condition_is_broadcast_at_every_scale(scale: float) -> None:
    x, t = inputs()
    g = torch.Generator().manual_seed(1)
    context, null = torch.randn(1, 2, 5, generator=g), torch.zeros(1, 2, 5)
    label = [torch.randn(1, 3, generator=g)]  # through lists too (CompVis' c_crossattn)
    broadcast, expanded = Spy(), Spy()
    out = guided_model(
        broadcast, B, guidance_scale=scale, cond={"context": context, "y": label}, uncond={"context": null, "y": label}
    )(x, t)
    reference = guided_model(
        expanded,
        B,
        guidance_scale=scale,
        cond={"context": context.expand(B, 2, 5), "y": [label[0].expand(B, 3)]},
        uncond={"context": null.expand(B, 2, 5), "y": [label[0].expand(B, 3)]},
    )(x, t)
    assert torch.equal(out, reference)
    seen = broadcast.calls[0][2]
    batch = B if scale == 1.0 else 2 * B
    assert seen["context"].shape == (batch, 2, 5) and seen["y"][0].shape == (batch, 3)
    # Spy: x·(1 + t) + Σ context per sample; the null context sums to 0, so the guided output is x·(1 + t) + s·Σ
    golden = x * (1 + t.float())[:, None] + scale * context.reshape(1, -1).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out, golden, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_a_condition_of_another_batch_is_refused_at_every_scale(scale: float) -> None:
    model = Spy()
    with pytest.raises(
        ValueError,
        match=r"^cond must have batch size 3 \(or 1, broadcast over the batch\), got shape \(2, 4\)",
    ):
        guided_model(model, B, guidance_scale=scale, cond=torch.ones(2, 4), uncond=torch.ones(B, 4))
    with pytest.raises(ValueError, match=r"^cond\['context'\] must have batch size 3 .* got shape \(2, 4\)"):
        guided_model(
            model, B, guidance_scale=scale, cond={"context": torch.ones(2, 4)}, uncond={"context": torch.ones(B, 4)}
        )
    # each side is named by what the caller passed: a tensor as itself, a mapping by its keys
    with pytest.raises(ValueError, match=r"^cond must have batch size 3 .* got shape \(2, 4\)"):
        guided_model(model, B, guidance_scale=scale, cond=torch.ones(2, 4), uncond={"cond": torch.ones(B, 4)})
    if scale != 1.0:  # at scale 1 the unconditional side is not used
        with pytest.raises(ValueError, match=r"^uncond must have batch size 3 .* got shape \(2, 4\)"):
            guided_model(model, B, guidance_scale=scale, cond={"cond": torch.ones(B, 4)}, uncond=torch.ones(2, 4))
    assert model.calls == []


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("key", ["crossattn", "concat", "hybrid"])
def test_latent_sample_with_a_batch_one_condition_equals_the_expanded_one(key: str, scale: float) -> None:
    from tests.test_latent import CTX, LDM, Z  # the tiny LDM lives with the latent tests

    model = LDM(key).eval()
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(B, Z, 4, 4, generator=g)
    parts = {"c_concat": torch.randn(1, Z, 4, 4, generator=g), "c_crossattn": torch.randn(1, 2, CTX, generator=g)}
    used = {"crossattn": ["c_crossattn"], "concat": ["c_concat"], "hybrid": ["c_concat", "c_crossattn"]}[key]

    def cond(null: bool, batch: int) -> dict[str, list[Tensor]]:
        return {k: [(parts[k] * (0.0 if null else 1.0)).expand(batch, *parts[k].shape[1:])] for k in used}

    options: dict[str, Any] = {"x_T": x_T, "num_steps": 3, "decode": False, "guidance_scale": scale}
    one = model.sample(x_T.shape, cond=cond(False, 1), uncond=cond(True, 1), **options)
    expanded = model.sample(x_T.shape, cond=cond(False, B), uncond=cond(True, B), **options)
    assert torch.equal(one, expanded)
