"""Sinusoidal timestep embedding: bitwise equal to CompVis' formula, golden values, layout, properties, errors.

Parity with diffusers' ``get_timestep_embedding`` lives in test_embedding_diffusers.py.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.embedding import SinusoidalTimestepEmbedding, timestep_embedding
from tests import compvis_reference as compvis


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 and 0.0 count as different."""
    return x.contiguous().view(torch.int32)


def numpy_embedding(t: np.ndarray, dim: int, max_period: float = 10000) -> np.ndarray:
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    args = t.astype(np.float64)[:, None] * freqs[None]
    out = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        out = np.concatenate([out, np.zeros((len(t), 1))], axis=1)
    return out


DIMS = [*range(1, 34), 63, 64, 77, 127, 320, 321, 1280]
TIMESTEPS = {
    "int64 0..999": torch.arange(1000),
    "int64 random": torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(0)),
    "int32": torch.arange(0, 1000, 7, dtype=torch.int32),
    "uint8": torch.arange(0, 256, dtype=torch.uint8),
    "int64 large": torch.tensor([0, 4095, 4096, 70000, 10**6]),
    "int64 negative": torch.tensor([-5, -1, 0, 3]),
    "float32 integral": torch.arange(0, 1000, 3).float(),
    "float32 fractional": torch.rand(300, generator=torch.Generator().manual_seed(1)) * 1000,
    "float32 minus zero": torch.tensor([-0.0, 0.0, 1.0]),
    "float32 continuous [0,1]": torch.rand(64, generator=torch.Generator().manual_seed(2)),
    "float64": torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 999,
    "empty": torch.zeros(0, dtype=torch.long),
}


@pytest.mark.parametrize("name", list(TIMESTEPS))
def test_bitwise_equal_to_compvis(name):
    t = TIMESTEPS[name]
    for dim in DIMS:
        if dim == 1:
            continue  # CompVis returns no column there (test_compvis_dim_one_quirk)
        ours = timestep_embedding(t, dim)
        ref = compvis.timestep_embedding(t, dim)
        assert ours.dtype == torch.float32 and ours.shape == (t.shape[0], dim)
        assert torch.equal(bits(ours), bits(ref)), (name, dim)


@pytest.mark.parametrize("max_period", [10, 100, 10000, 12345.5])
def test_bitwise_equal_to_compvis_other_max_period(max_period):
    t = torch.arange(0, 1000, 13)
    for dim in (8, 33, 320):
        ref = compvis.timestep_embedding(t, dim, max_period)
        assert torch.equal(bits(timestep_embedding(t, dim, max_period)), bits(ref))
        frac = t.float() + 0.25
        ref = compvis.timestep_embedding(frac, dim, max_period)
        assert torch.equal(bits(timestep_embedding(frac, dim, max_period)), bits(ref))


def test_compvis_dim_one_quirk():
    t = torch.tensor([0, 5, 999])
    assert compvis.timestep_embedding(t, 1).shape == (3, 0)  # CompVis pads an empty embedding with an empty column
    assert torch.equal(timestep_embedding(t, 1), torch.zeros(3, 1))  # the documented shape (B, dim)


def test_repeat_only_equals_compvis():
    for t in (torch.tensor([3, 1, 4], dtype=torch.int32), torch.tensor([0.5, 2.0], dtype=torch.float64)):
        ref = compvis.timestep_embedding(t, 7, repeat_only=True)
        out = timestep_embedding(t, 7, repeat_only=True)
        assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_golden_values_from_numpy():
    t = np.array([0, 1, 10, 500, 999])
    for dim in (2, 7, 320):
        ours = timestep_embedding(torch.from_numpy(t), dim).double().numpy()
        # float32 arguments of size up to ~1000 carry an absolute rounding of ~6e-5 into sin/cos
        np.testing.assert_allclose(ours, numpy_embedding(t, dim), rtol=0, atol=1e-4)
    exact = timestep_embedding(torch.tensor([0]), 6)
    assert exact.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]  # cos first


def test_layout_cos_first_and_zero_column():
    t = torch.tensor([3.0, 250.0])
    out = timestep_embedding(t, 9)
    half = 4
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs
    assert torch.equal(out[:, :half], torch.cos(args))
    assert torch.equal(out[:, half : 2 * half], torch.sin(args))
    assert torch.equal(out[:, -1], torch.zeros(2))


def test_dim_one_gives_zero_column():
    out = timestep_embedding(torch.tensor([0, 5, 999]), 1)
    assert out.shape == (3, 1) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(3, 1))
    assert torch.equal(timestep_embedding(torch.tensor([0.5, 2.0]), 1), torch.zeros(2, 1))


def test_table_path_and_direct_path_agree_bitwise():
    # integer (table) path and fractional-capable (direct) path: the same timesteps through both
    t_int = torch.arange(0, 2000, 3)
    t_float = t_int.double()  # float64 integral values go through the direct path after .float()
    for dim in (5, 320, 1280):
        assert torch.equal(bits(timestep_embedding(t_int, dim)), bits(timestep_embedding(t_float, dim)))


def test_result_does_not_alias_cache():
    t = torch.tensor([1, 2, 3])
    first = timestep_embedding(t, 16)
    expected = first.clone()
    first.zero_()
    assert torch.equal(timestep_embedding(t, 16), expected)


def test_inference_mode_then_autograd():
    t = torch.tensor([0.5, 7.25])
    with torch.inference_mode():
        timestep_embedding(t, 12)
        timestep_embedding(torch.tensor([1, 2]), 12)
    tg = t.clone().requires_grad_(True)
    out = timestep_embedding(tg, 12)
    out.sum().backward()
    freqs = torch.exp(-math.log(10000) * torch.arange(6, dtype=torch.float32) / 6)
    args = t[:, None] * freqs
    expected = ((-torch.sin(args) + torch.cos(args)) * freqs).sum(1)
    torch.testing.assert_close(tg.grad, expected)
    assert torch.equal(out.detach(), timestep_embedding(t, 12))


def test_repeat_only_broadcasts_in_input_dtype():
    t = torch.tensor([3, 1, 4], dtype=torch.int32)
    out = timestep_embedding(t, 5, repeat_only=True)
    assert out.dtype == torch.int32 and out.shape == (3, 5)
    assert out.tolist() == [[3] * 5, [1] * 5, [4] * 5]
    f = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert timestep_embedding(f, 2, repeat_only=True).dtype == torch.float64


def test_module_bitwise_equal_to_function():
    module = SinusoidalTimestepEmbedding(321, max_period=5000)
    assert "dim=321" in repr(module)
    assert list(module.state_dict()) == []
    for t in (torch.arange(1000), torch.rand(100) * 1000):
        assert torch.equal(bits(module(t)), bits(timestep_embedding(t, 321, 5000)))
    module.to(torch.bfloat16)  # a precision cast cannot reach the table
    assert module(torch.arange(4)).dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    t=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32, allow_subnormal=False), min_size=1, max_size=20),
    dim=st.integers(2, 70),
)
def test_property_bounded_and_matches_compvis(t, dim):
    ts = torch.tensor(t, dtype=torch.float32)
    out = timestep_embedding(ts, dim)
    assert out.abs().max() <= 1.0
    assert torch.equal(bits(out), bits(compvis.timestep_embedding(ts, dim)))


@settings(max_examples=30, deadline=None)
@given(t=st.lists(st.integers(0, 5000), min_size=1, max_size=30), dim=st.integers(2, 70))
def test_property_integer_timesteps_match_compvis(t, dim):
    ts = torch.tensor(t, dtype=torch.long)
    assert torch.equal(bits(timestep_embedding(ts, dim)), bits(compvis.timestep_embedding(ts, dim)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timesteps": torch.tensor(3), "dim": 4}, ValueError, r"timesteps must be 1-D .* got shape \(\)"),
        ({"timesteps": torch.zeros(2, 3), "dim": 4}, ValueError, r"timesteps must be 1-D .* got shape \(2, 3\)"),
        ({"timesteps": [1, 2], "dim": 4}, TypeError, "timesteps must be a torch.Tensor, got list"),
        ({"timesteps": torch.tensor([True]), "dim": 4}, TypeError, "real numbers .* torch.bool"),
        ({"timesteps": torch.tensor([1j]), "dim": 4}, TypeError, "real numbers .* torch.complex64"),
        ({"timesteps": torch.tensor([1]), "dim": 0}, ValueError, r"dim=0 is out of range; expected an integer >= 1"),
        ({"timesteps": torch.tensor([1]), "dim": -3}, ValueError, r"dim=-3 is out of range"),
        ({"timesteps": torch.tensor([1]), "dim": 4.0}, TypeError, "dim must be an integer, got 4.0"),
        ({"timesteps": torch.tensor([1]), "dim": 4, "max_period": 0}, ValueError, r"max_period=0 is out of range"),
        ({"timesteps": torch.tensor([1]), "dim": 4, "max_period": "x"}, TypeError, "max_period must be a real"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        timestep_embedding(**kwargs)


def test_module_errors():
    with pytest.raises(ValueError, match=r"dim=0 is out of range"):
        SinusoidalTimestepEmbedding(0)
    with pytest.raises(ValueError, match=r"max_period=-1 is out of range"):
        SinusoidalTimestepEmbedding(4, max_period=-1)
    with pytest.raises(ValueError, match="timesteps must be 1-D"):
        SinusoidalTimestepEmbedding(4)(torch.zeros(2, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bitwise_equal_to_compvis():
    for t in (torch.arange(1000, device="cuda"), torch.rand(300, device="cuda") * 1000):
        for dim in (7, 320, 1280):
            out = timestep_embedding(t, dim)
            assert out.device == t.device
            assert torch.equal(bits(out), bits(compvis.timestep_embedding(t, dim)))
