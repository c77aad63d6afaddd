import math

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.blending import MERGE_STRATEGIES, AlphaBlender


def seed_alpha(blender: AlphaBlender, indicator):
    """CompVis' get_alpha (sgm), written out."""
    if blender.merge_strategy == "fixed":
        return blender.mix_factor
    if blender.merge_strategy == "learned":
        return torch.sigmoid(blender.mix_factor)
    alpha = torch.where(
        indicator.bool(), torch.ones(1, 1), rearrange(torch.sigmoid(blender.mix_factor), "... -> ... 1")
    )
    return rearrange(alpha, blender.rearrange_pattern)


def seed_forward(blender, x_spatial, x_temporal, indicator=None):
    alpha = seed_alpha(blender, indicator)
    return alpha.to(x_spatial.dtype) * x_spatial + (1.0 - alpha).to(x_spatial.dtype) * x_temporal


B, T, S, C, H, W = 2, 3, 5, 4, 3, 2
GEN = torch.Generator().manual_seed(0)
INDICATOR = torch.tensor([[0, 1, 0], [1, 1, 0]])
LAYOUTS = {
    # pattern, x shape
    "tokens (B·T, S, C)": ("b t -> (b t) 1 1", (B * T, S, C)),
    "video (B, C, T, H, W)": ("b t -> b 1 t 1 1", (B, C, T, H, W)),
}


@pytest.mark.parametrize("strategy", MERGE_STRATEGIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_seed_formula(strategy, layout, dtype):
    pattern, shape = LAYOUTS[layout]
    blender = AlphaBlender(0.3 if strategy == "fixed" else 0.5, strategy, pattern)
    xs = torch.randn(shape, generator=GEN).to(dtype)
    xt = torch.randn(shape, generator=GEN).to(dtype)
    out = blender(xs, xt, INDICATOR)
    ref = seed_forward(blender, xs, xt, INDICATOR)
    assert out.dtype == dtype and out.shape == shape
    # float32: a few ulp (lerp rounds once, CompVis three times); bf16: one bf16 ulp of |x| < 8
    atol = {torch.float32: 1e-6, torch.float64: 1e-15, torch.bfloat16: 2**-4}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=atol)


def test_max_difference_to_seed_formula_float32_is_ulp_level():
    blender = AlphaBlender(0.5, "learned_with_images", "b t -> b 1 t 1 1")
    xs, xt = torch.randn(2, 2, 8, 16, 3, 4, generator=GEN).unbind(0)
    ind = torch.zeros(2, 16, dtype=torch.bool)
    diff = (blender(xs, xt, ind) - seed_forward(blender, xs, xt, ind)).abs().max().item()
    assert diff <= 4 * torch.finfo(torch.float32).eps * max(xs.abs().max().item(), xt.abs().max().item())


def test_fixed_has_a_buffer_learned_a_parameter():
    fixed = AlphaBlender(0.25, "fixed")
    assert list(fixed.state_dict()) == ["mix_factor"]
    assert [name for name, _ in fixed.named_buffers()] == ["mix_factor"] and not list(fixed.parameters())
    assert fixed.mix_factor.shape == (1,) and fixed.mix_factor.dtype == torch.float32
    assert fixed.get_alpha().tolist() == [0.25]  # no sigmoid
    for strategy in ("learned", "learned_with_images"):
        learned = AlphaBlender(0.5, strategy)
        assert isinstance(learned.mix_factor, torch.nn.Parameter)
        assert list(learned.state_dict()) == ["mix_factor"] and not list(learned.buffers())
        assert learned.mix_factor.shape == (1,) and learned.mix_factor.dtype == torch.float32
    assert AlphaBlender(0.5, "learned").get_alpha().item() == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_state_dict_round_trip():
    a = AlphaBlender(0.1, "learned")
    with torch.no_grad():
        a.mix_factor.fill_(-1.5)
    b = AlphaBlender(0.9, "learned")
    b.load_state_dict(a.state_dict())
    assert b.mix_factor.item() == -1.5


@pytest.mark.parametrize("strategy", ["fixed", "learned"])
def test_fixed_and_learned_work_without_indicator(strategy):
    blender = AlphaBlender(0.75, strategy)
    xs, xt = torch.ones(2, 3), torch.zeros(2, 3)
    alpha = 0.75 if strategy == "fixed" else 1 / (1 + math.exp(-0.75))
    torch.testing.assert_close(blender(xs, xt), torch.full((2, 3), alpha))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_image_only_frames_give_exactly_the_spatial_path(layout):
    pattern, shape = LAYOUTS[layout]
    blender = AlphaBlender(0.5, "learned_with_images", pattern)
    xs, xt = torch.randn(shape, generator=GEN), torch.randn(shape, generator=GEN)
    out = blender(xs, xt, INDICATOR)
    if layout.startswith("tokens"):
        mask = INDICATOR.bool().flatten()
        assert torch.equal(out[mask], xs[mask])
        assert not torch.equal(out[~mask], xs[~mask])
    else:
        mask = INDICATOR.bool()  # (B, T) over dims 0 and 2
        assert torch.equal(out.permute(0, 2, 1, 3, 4)[mask], xs.permute(0, 2, 1, 3, 4)[mask])
    all_images = torch.ones(B, T, dtype=torch.bool)
    assert torch.equal(blender(xs, xt, all_images), xs)


def test_all_image_batch_gives_mix_factor_zero_gradient():
    blender = AlphaBlender(0.5, "learned_with_images")
    xs = torch.randn(B * T, S, C, generator=GEN)
    xt = torch.randn(B * T, S, C, generator=GEN)
    blender(xs, xt, torch.ones(B, T)).square().sum().backward()
    assert blender.mix_factor.grad is not None and blender.mix_factor.grad.item() == 0.0
    blender.zero_grad()
    blender(xs, xt, torch.zeros(B, T)).square().sum().backward()
    # d/dm of sum((α xs + (1-α) xt)²) with α = σ(m): 2·Σ out·(xs − xt)·σ'(m)
    a = torch.sigmoid(torch.tensor(0.5))
    expected = (2 * (a * xs + (1 - a) * xt) * (xs - xt)).sum() * a * (1 - a)
    torch.testing.assert_close(blender.mix_factor.grad, expected.reshape(1))


def test_alpha_is_cast_to_x_spatial_dtype_and_mixed_dtypes_promote_like_the_seed():
    blender = AlphaBlender(0.5, "learned")
    xs = torch.randn(4, 3, generator=GEN).to(torch.bfloat16)
    xt = torch.randn(4, 3, generator=GEN)
    out = blender(xs, xt)
    ref = seed_forward(blender, xs, xt)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert blender(xs, xt.bfloat16()).dtype == torch.bfloat16


def test_flattened_frames_4d_with_default_pattern_align_on_batch():
    # (B·T, C, H, W) frames with "b t -> (b t) 1 1": α is aligned on the batch dimension
    blender = AlphaBlender(0.5, "learned_with_images")
    shape = (B * T, B * T, H, W)  # C == B·T: CompVis would silently mix by channel here
    xs, xt = torch.randn(shape, generator=GEN), torch.randn(shape, generator=GEN)
    out = blender(xs, xt, INDICATOR)
    alpha = torch.where(INDICATOR.bool(), 1.0, torch.sigmoid(torch.tensor(0.5))).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, alpha * xs + (1 - alpha) * xt, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(0.0, 1.0, allow_subnormal=False),
    xs=st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=1, max_size=16),
    data=st.data(),
)
def test_property_output_between_inputs(alpha, xs, data):
    xt = data.draw(st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=len(xs), max_size=len(xs)))
    a, b = torch.tensor(xs), torch.tensor(xt)
    out = AlphaBlender(alpha, "fixed")(a, b)
    assert torch.all(out >= torch.minimum(a, b)) and torch.all(out <= torch.maximum(a, b))
    logit = data.draw(st.floats(-20, 20, allow_subnormal=False))
    out = AlphaBlender(logit, "learned")(a, b)
    assert torch.all(out >= torch.minimum(a, b)) and torch.all(out <= torch.maximum(a, b))


def test_fixed_endpoints_are_exact():
    xs, xt = torch.randn(3, 4, generator=GEN), torch.randn(3, 4, generator=GEN)
    assert torch.equal(AlphaBlender(1.0, "fixed")(xs, xt), xs)
    assert torch.equal(AlphaBlender(0.0, "fixed")(xs, xt), xt)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0.5, "mean"), ValueError, r"merge_strategy='mean' is not supported; expected one of 'learned', 'fixed'"),
        ((1.5, "fixed"), ValueError, r"alpha=1.5 is out of range; expected a number in \[0, 1\]"),
        ((-0.1, "fixed"), ValueError, r"alpha=-0.1 is out of range"),
        ((float("nan"), "learned"), ValueError, "alpha=nan must be finite"),
        (("0.5", "learned"), TypeError, "alpha must be a real number"),
        ((0.5, "learned", 3), TypeError, "rearrange_pattern must be a string, got 3 of type int"),
        ((0.5, "learned", "b t"), ValueError, "rearrange_pattern='b t' is not an einops pattern"),
        ((0.5, "learned", "b t -> b q"), ValueError, r"rearrange_pattern='b t -> b q' is not an einops pattern over"),
        ((0.5, "learned", "b c h -> b c h 1"), ValueError, r"expected e.g. 'b t -> \(b t\) 1 1'"),
    ],
)
def test_constructor_errors(args, error, match):
    with pytest.raises(error, match=match):
        AlphaBlender(*args)


def test_forward_errors():
    blender = AlphaBlender(0.5, "learned_with_images")
    xs = torch.zeros(B * T, S, C)
    with pytest.raises(ValueError, match="needs image_only_indicator, a \\(B, T\\) tensor"):
        blender(xs, xs)
    with pytest.raises(ValueError, match="needs image_only_indicator"):
        blender.get_alpha()
    with pytest.raises(ValueError, match=r"image_only_indicator must be a \(B, T\) tensor, got shape \(6,\)"):
        blender(xs, xs, torch.zeros(B * T))
    with pytest.raises(ValueError, match=r"x_spatial and x_temporal must have the same shape, got \(6, 5, 4\) and"):
        blender(xs, torch.zeros(B * T, S, C + 1), INDICATOR)
    with pytest.raises(ValueError, match=r"alpha of shape \(4, 1, 1\) .* does not fit inputs of shape \(6, 5, 4\)"):
        blender(xs, xs, torch.zeros(2, 2))
    video = AlphaBlender(0.5, "learned_with_images", "b t -> b 1 t 1 1")
    with pytest.raises(ValueError, match=r"alpha of shape \(2, 1, 3, 1, 1\) .* does not fit inputs of shape \(6, 5"):
        video(xs, xs, INDICATOR)
