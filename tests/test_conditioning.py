"""Condition routing (CompVis DiffusionWrapper + apply_model) and condition dropout for classifier-free guidance."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_ldm.conditioning import (
    COND_DICT_KEYS,
    CONDITIONING_KEYS,
    HybridConditioner,
    apply_conditioned,
    as_cond_dict,
    drop_conditions,
)


class Recorder:
    """A fake denoiser that records its call and returns a tag."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append((args, kwargs))
        return "out"


def reference_apply_model(model: Any, x: Tensor, t: Tensor, cond: Any, key: str | None) -> Any:
    """CompVis LatentDiffusion.apply_model + DiffusionWrapper.forward, transcribed."""
    if isinstance(cond, dict):
        pass
    else:
        if not isinstance(cond, list):
            cond = [cond]
        cond = {"c_concat" if key == "concat" else "c_crossattn": cond}
    c_concat, c_crossattn = cond.get("c_concat"), cond.get("c_crossattn")
    if key is None:
        return model(x, t)
    if key == "concat":
        return model(torch.cat([x, *c_concat], dim=1), t)
    if key == "crossattn":
        return model(x, t, context=torch.cat(c_crossattn, 1))
    if key == "hybrid":
        return model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
    if key == "adm":
        return model(x, t, y=c_crossattn[0])
    raise NotImplementedError(key)


X = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).reshape(2, 2, 3, 3)
T = torch.tensor([5, 7])
C1 = 100 + torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
C2 = 200 + torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
CTX1 = 300 + torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
CTX2 = 400 + torch.arange(2 * 2 * 5, dtype=torch.float32).reshape(2, 2, 5)


def golden_concat() -> Tensor:
    out = torch.empty(2, 6, 3, 3)
    out[:, 0:2] = X
    out[:, 2:3] = C1
    out[:, 3:6] = C2
    return out


def golden_context() -> Tensor:
    out = torch.empty(2, 6, 5)
    out[:, 0:4] = CTX1
    out[:, 4:6] = CTX2
    return out


def only_call(rec: Recorder) -> tuple[tuple[Any, ...], dict[str, Any]]:
    assert len(rec.calls) == 1
    return rec.calls[0]


def test_concat_golden() -> None:
    rec = Recorder()
    assert apply_conditioned(rec, X, T, {"c_concat": [C1, C2]}, "concat") == "out"
    (xc, t), kwargs = only_call(rec)
    assert kwargs == {}
    assert t is T
    torch.testing.assert_close(xc, golden_concat(), rtol=0, atol=0)


def test_crossattn_golden() -> None:
    rec = Recorder()
    apply_conditioned(rec, X, T, {"c_crossattn": [CTX1, CTX2]}, "crossattn")
    (x, t), kwargs = only_call(rec)
    assert x is X and t is T and set(kwargs) == {"context"}
    torch.testing.assert_close(kwargs["context"], golden_context(), rtol=0, atol=0)


def test_hybrid_golden() -> None:
    rec = Recorder()
    apply_conditioned(rec, X, T, {"c_concat": [C1, C2], "c_crossattn": [CTX1, CTX2]}, "hybrid")
    (xc, _), kwargs = only_call(rec)
    torch.testing.assert_close(xc, golden_concat(), rtol=0, atol=0)
    torch.testing.assert_close(kwargs["context"], golden_context(), rtol=0, atol=0)


def test_adm_golden() -> None:
    rec = Recorder()
    y = torch.tensor([3, 1])
    apply_conditioned(rec, X, T, y, "adm")
    (x, t), kwargs = only_call(rec)
    assert x is X and t is T and set(kwargs) == {"y"} and kwargs["y"] is y


def test_unconditional() -> None:
    rec = Recorder()
    apply_conditioned(rec, X, T, None, None)
    assert only_call(rec) == ((X, T), {})


def test_bare_tensor_goes_under_the_key_apply_model_chooses() -> None:
    assert as_cond_dict(C1, "concat") == {"c_concat": [C1]}
    for key in ("crossattn", "hybrid", "adm", None):
        assert as_cond_dict(CTX1, key) == {"c_crossattn": [CTX1]}
    assert as_cond_dict([CTX1, CTX2], "crossattn") == {"c_crossattn": [CTX1, CTX2]}
    assert as_cond_dict({"c_crossattn": CTX1}, "crossattn") == {"c_crossattn": [CTX1]}
    assert as_cond_dict(None, "crossattn") == {}


CASES: list[tuple[str | None, Any]] = [
    ("concat", C1),
    ("concat", [C1, C2]),
    ("concat", {"c_concat": [C2]}),
    ("crossattn", CTX1),
    ("crossattn", [CTX1, CTX2]),
    ("hybrid", {"c_concat": [C1], "c_crossattn": [CTX2, CTX1]}),
    ("adm", CTX1[:, 0]),
    ("adm", [CTX1[:, 0]]),
]


@pytest.mark.parametrize(("key", "cond"), CASES)
def test_matches_the_reference_transcription(key: str | None, cond: Any) -> None:
    ours, ref = Recorder(), Recorder()
    apply_conditioned(ours, X, T, cond, key)
    reference_apply_model(ref, X, T, cond, key)
    (a_args, a_kw), (b_args, b_kw) = only_call(ours), only_call(ref)
    assert len(a_args) == len(b_args) and set(a_kw) == set(b_kw)
    for a, b in zip([*a_args, *a_kw.values()], [*b_args, *(b_kw[k] for k in a_kw)], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hybrid_conditioner_output_routes() -> None:
    torch.manual_seed(0)
    concat, cross = nn.Conv2d(1, 3, 1), nn.Linear(5, 7)
    conditioner = HybridConditioner(concat, cross)
    src_concat, src_cross = torch.randn(2, 1, 3, 3), torch.randn(2, 4, 5)
    cond = conditioner(src_concat, src_cross)
    rec = Recorder()
    apply_conditioned(rec, X, T, cond, "hybrid")
    (xc, _), kwargs = only_call(rec)
    expected_xc = torch.empty(2, 5, 3, 3)
    expected_xc[:, :2] = X
    expected_xc[:, 2:] = concat(src_concat)
    torch.testing.assert_close(xc, expected_xc, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["context"], cross(src_cross), rtol=0, atol=0)


def test_a_real_network_gets_the_concatenated_input() -> None:
    net = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1))

    def model(x: Tensor, t: Tensor) -> Tensor:
        return net(x)

    out = apply_conditioned(model, X, T, C1, "concat")
    torch.testing.assert_close(out, X[:, :1] + 10 * X[:, 1:2] + 100 * C1, rtol=0, atol=1e-3)


def test_keys() -> None:
    assert CONDITIONING_KEYS == ("concat", "crossattn", "hybrid", "adm")
    assert COND_DICT_KEYS == ("c_concat", "c_crossattn")


@pytest.mark.parametrize(
    ("key", "cond", "error", "match"),
    [
        ("film", CTX1, ValueError, r"conditioning_key='film' is not supported; expected one of 'concat', 'crossattn'"),
        ("crossattn", 3.0, TypeError, r"cond must be a Tensor, a list of Tensors, a dict .* got float"),
        ("crossattn", {"c_crossattn": [CTX1, "a"]}, TypeError, r"cond\['c_crossattn'\] must be a Tensor or a list"),
        ("crossattn", {"context": CTX1}, ValueError, r"cond has the keys \['context'\]; expected keys among"),
        ("crossattn", [], ValueError, r"cond is an empty list"),
        ("crossattn", None, ValueError, r"uses \['c_crossattn'\]; cond has \[\] \(missing: \['c_crossattn'\]\)"),
        ("crossattn", {"c_concat": C1, "c_crossattn": CTX1}, ValueError, r"\(unused: \['c_concat'\]\)"),
        (None, CTX1, ValueError, r"conditioning_key=None uses \[\]; cond has \['c_crossattn'\]"),
        ("hybrid", {"c_concat": C1}, ValueError, r"missing: \['c_crossattn'\]"),
        ("adm", [CTX1[:, 0], CTX1[:, 1]], ValueError, r"'adm' takes one class/vector condition, got 2"),
        ("concat", C1[:, :, :2], ValueError, r"c_concat\[0\] has shape \(2, 1, 2, 3\).*x \(2, 2, 3, 3\)"),
        ("concat", C1[:1], ValueError, r"c_concat\[0\] has shape \(1, 1, 3, 3\)"),
        ("crossattn", [CTX1, CTX2[..., :4]], ValueError, r"c_crossattn\[1\] has shape \(2, 2, 4\).*\(2, 4, 5\)"),
        ("crossattn", CTX1[:1], ValueError, r"x's batch 2"),
    ],
)
def test_routing_errors(key: Any, cond: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        apply_conditioned(Recorder(), X, T, cond, key)


# ------------------------------------------------------------------------------------------------ dropout
def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mask_is_torch_rand_below_p_in_key_order() -> None:
    cond = {"c_crossattn": [CTX1.repeat(4, 1, 1)], "c_concat": [C1.repeat(4, 1, 1, 1)]}
    _, masks = drop_conditions(cond, {"c_crossattn": 0.3, "c_concat": 0.6}, generator=seeded(11))
    ref = seeded(11)
    expected_concat = torch.rand(8, generator=ref) < 0.6  # c_concat is drawn first whatever the mapping order
    expected_cross = torch.rand(8, generator=ref) < 0.3
    assert torch.equal(masks["c_concat"], expected_concat)
    assert torch.equal(masks["c_crossattn"], expected_cross)
    assert masks["c_concat"].dtype == torch.bool and masks["c_concat"].shape == (8,)


def test_null_replacement_values_and_no_in_place_edit() -> None:
    batch = 64
    ctx = torch.randn(batch, 4, 5, generator=seeded(0))
    ctx_before = ctx.clone()
    null = torch.full((4, 5), -7.0)
    cond = {"c_crossattn": [ctx], "c_concat": [C1.repeat(32, 1, 1, 1)]}
    new, masks = drop_conditions(cond, {"c_crossattn": 0.5}, {"c_crossattn": null}, generator=seeded(3))
    mask = torch.rand(batch, generator=seeded(3)) < 0.5
    assert torch.equal(masks["c_crossattn"], mask)
    assert 0 < int(mask.sum()) < batch
    expected = ctx_before.clone()
    expected[mask] = -7.0
    torch.testing.assert_close(new["c_crossattn"][0], expected, rtol=0, atol=0)
    assert torch.equal(ctx, ctx_before)
    assert new["c_concat"][0] is cond["c_concat"][0]
    assert new is not cond and new["c_crossattn"] is not cond["c_crossattn"]


@pytest.mark.parametrize("null_shape", [(4, 5), (1, 4, 5), (3, 4, 5)])
def test_null_broadcast_shapes(null_shape: tuple[int, ...]) -> None:
    ctx = torch.randn(3, 4, 5, generator=seeded(1))
    null = torch.randn(null_shape, generator=seeded(2))
    new, masks = drop_conditions({"c_crossattn": [ctx]}, {"c_crossattn": 1.0}, {"c_crossattn": null})
    assert bool(masks["c_crossattn"].all())
    torch.testing.assert_close(new["c_crossattn"][0], null.expand(3, 4, 5), rtol=0, atol=0)


def test_p_zero_and_one_extremes_and_zeros_default() -> None:
    ctx = torch.randn(256, 4, 5, generator=seeded(4))
    kept, m0 = drop_conditions({"c_crossattn": [ctx]}, {"c_crossattn": 0.0}, generator=seeded(5))
    dropped, m1 = drop_conditions({"c_crossattn": [ctx]}, {"c_crossattn": 1.0}, generator=seeded(5))
    assert not bool(m0["c_crossattn"].any()) and bool(m1["c_crossattn"].all())
    assert torch.equal(kept["c_crossattn"][0], ctx)
    assert torch.equal(dropped["c_crossattn"][0], torch.zeros_like(ctx))


def test_generator_advances_the_same_for_any_p() -> None:
    ctx = [torch.randn(6, 4, 5)]
    after = []
    for p in (0.0, 0.4, 1.0):
        gen = seeded(9)
        drop_conditions({"c_crossattn": ctx}, {"c_crossattn": p}, generator=gen)
        after.append(torch.rand(3, generator=gen))
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_mask_does_not_depend_on_the_sample_dtype(dtype: torch.dtype) -> None:
    ctx = torch.randn(32, 4, 5).to(dtype)
    _, masks = drop_conditions({"c_crossattn": [ctx]}, {"c_crossattn": 0.25}, generator=seeded(21))
    assert torch.equal(masks["c_crossattn"], torch.rand(32, generator=seeded(21)) < 0.25)


def test_several_tensors_under_one_key_share_the_mask() -> None:
    a, b = torch.randn(16, 2, 5, generator=seeded(6)), torch.randn(16, 3, 5, generator=seeded(7))
    na, nb = torch.ones(2, 5), None
    new, masks = drop_conditions(
        {"c_crossattn": [a, b]}, {"c_crossattn": 0.5}, {"c_crossattn": [na, nb]}, generator=seeded(8)
    )
    m = masks["c_crossattn"]
    assert 0 < int(m.sum()) < 16
    torch.testing.assert_close(new["c_crossattn"][0], torch.where(m[:, None, None], 1.0, a), rtol=0, atol=0)
    torch.testing.assert_close(new["c_crossattn"][1], torch.where(m[:, None, None], 0.0, b), rtol=0, atol=0)


def test_learned_null_gets_gradients() -> None:
    null = nn.Parameter(torch.zeros(4, 5))
    ctx = torch.randn(8, 4, 5)
    new, masks = drop_conditions(
        {"c_crossattn": [ctx]}, {"c_crossattn": 0.5}, {"c_crossattn": null}, generator=seeded(2)
    )
    new["c_crossattn"][0].sum().backward()
    assert null.grad is not None
    torch.testing.assert_close(null.grad, torch.full((4, 5), float(masks["c_crossattn"].sum())), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.0, 1.0, allow_subnormal=False), batch=st.integers(1, 40))
def test_mask_property(seed: int, p: float, batch: int) -> None:
    ctx = torch.zeros(batch, 1, 2)
    new, masks = drop_conditions(
        {"c_crossattn": [ctx]}, {"c_crossattn": p}, {"c_crossattn": torch.ones(1, 2)}, generator=seeded(seed)
    )
    expected = torch.rand(batch, generator=seeded(seed), dtype=torch.float32) < p
    assert torch.equal(masks["c_crossattn"], expected)
    assert torch.equal(new["c_crossattn"][0][:, 0, 0], expected.float())


def test_drop_then_route() -> None:
    cond = as_cond_dict([CTX1], "crossattn")
    new, _ = drop_conditions(cond, {"c_crossattn": 1.0}, {"c_crossattn": torch.full((4, 5), 2.0)}, generator=seeded(0))
    rec = Recorder()
    apply_conditioned(rec, X, T, new, "crossattn")
    torch.testing.assert_close(only_call(rec)[1]["context"], torch.full((2, 4, 5), 2.0), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("probs", "null", "cond", "error", "match"),
    [
        (
            {"c_crossattn": 1.5},
            None,
            None,
            ValueError,
            r"probs\['c_crossattn'\]=1.5 is out of range; expected a number in \[0, 1\]",
        ),
        ({"c_crossattn": -0.1}, None, None, ValueError, r"probs\['c_crossattn'\]=-0.1 is out of range"),
        ({"c_crossattn": float("nan")}, None, None, ValueError, r"probs\['c_crossattn'\]=nan must be finite"),
        ({"c_crossattn": "0.1"}, None, None, TypeError, r"probs\['c_crossattn'\] must be a real number"),
        ({"c_concat": 0.1}, None, None, ValueError, r"probs has the keys \['c_concat'\], which are not keys of cond"),
        ({"c_crossattn": 0.1}, {"c_concat": None}, None, ValueError, r"null has the keys \['c_concat'\]"),
        (
            {"c_crossattn": 0.1},
            {"c_crossattn": torch.zeros(4, 6)},
            None,
            ValueError,
            r"null\['c_crossattn'\] has shape \(4, 6\), which does not fit cond\['c_crossattn'\]\[0\] "
            r"of shape \(2, 4, 5\); "
            r"expected \(4, 5\), \(1, 4, 5\) or \(2, 4, 5\)",
        ),
        ({"c_crossattn": 0.1}, {"c_crossattn": torch.zeros(3, 4, 5)}, None, ValueError, r"has shape \(3, 4, 5\)"),
        (
            {"c_crossattn": 0.1},
            {"c_crossattn": [None, None]},
            None,
            ValueError,
            r"holds 2 conditions but cond\['c_crossattn'\] holds 1",
        ),
        ({"c_crossattn": 0.1}, {"c_crossattn": "none"}, None, TypeError, r"null\['c_crossattn'\] must be a Tensor"),
        (
            {"c_crossattn": 0.1},
            {"c_crossattn": torch.zeros(4, 5)},
            {"c_crossattn": [CTX1, CTX1]},
            ValueError,
            r"null\['c_crossattn'\] is one Tensor but cond\['c_crossattn'\] holds 2",
        ),
        (
            {"c_crossattn": 0.1},
            None,
            {"c_crossattn": [CTX1, CTX1[:1]]},
            ValueError,
            r"must share one batch size, got shapes \[\(2, 4, 5\), \(1, 4, 5\)\]",
        ),
    ],
)
def test_dropout_errors(probs: Any, null: Any, cond: Any, error: type[Exception], match: str) -> None:
    cond = {"c_crossattn": [CTX1]} if cond is None else cond
    with pytest.raises(error, match=match):
        drop_conditions(cond, probs, null, generator=seeded(0))
