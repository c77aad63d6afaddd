"""Sinusoidal timestep embedding against diffusers' ``get_timestep_embedding`` (``flip_sin_to_cos=True``, shift 0).

diffusers is a declared test dependency: it is imported plainly, so a missing install fails collection loudly.
"""

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.embedding import timestep_embedding
from tests.test_embedding import DIMS, TIMESTEPS, bits


def reference(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    try:
        return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)
    except RuntimeError as err:
        # for an odd dim diffusers pads its (0, dim - 1) result, which torch < 2.13 refuses ("negative output
        # size"); the reference's answer is then the empty (0, dim) float32 tensor
        if t.numel() != 0 or "negative output size" not in str(err):
            raise
        return torch.zeros(0, dim)


@pytest.mark.parametrize("name", list(TIMESTEPS))
def test_bitwise_equal_to_diffusers(name):
    t = TIMESTEPS[name]
    for dim in DIMS:
        ours = timestep_embedding(t, dim)
        ref = reference(t, dim)
        assert ours.dtype == torch.float32 and ours.shape == (t.shape[0], dim)
        assert torch.equal(bits(ours), bits(ref)), (name, dim)


@pytest.mark.parametrize("max_period", [10, 100, 10000, 12345.5])
def test_bitwise_equal_to_diffusers_other_max_period(max_period):
    t = torch.arange(0, 1000, 13)
    for dim in (8, 33, 320):
        assert torch.equal(bits(timestep_embedding(t, dim, max_period)), bits(reference(t, dim, max_period)))
        frac = t.float() + 0.25
        assert torch.equal(bits(timestep_embedding(frac, dim, max_period)), bits(reference(frac, dim, max_period)))


@settings(max_examples=40, deadline=None)
@given(
    t=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32, allow_subnormal=False), min_size=1, max_size=20),
    dim=st.integers(1, 70),
)
def test_property_bounded_and_matches_diffusers(t, dim):
    ts = torch.tensor(t, dtype=torch.float32)
    out = timestep_embedding(ts, dim)
    assert out.abs().max() <= 1.0
    assert torch.equal(bits(out), bits(reference(ts, dim)))


@settings(max_examples=30, deadline=None)
@given(t=st.lists(st.integers(0, 5000), min_size=1, max_size=30), dim=st.integers(1, 70))
def test_property_integer_timesteps_match_diffusers(t, dim):
    ts = torch.tensor(t, dtype=torch.long)
    assert torch.equal(bits(timestep_embedding(ts, dim)), bits(reference(ts, dim)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bitwise_equal_to_diffusers():
    for t in (torch.arange(1000, device="cuda"), torch.rand(300, device="cuda") * 1000):
        for dim in (7, 320, 1280):
            out = timestep_embedding(t, dim)
            assert out.device == t.device
            assert torch.equal(bits(out), bits(reference(t, dim)))
