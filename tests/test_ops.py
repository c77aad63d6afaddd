import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_ldm._checks import check_timesteps
from lightning_ldm.ops import (
    avg_pool_nd,
    extract_into_tensor,
    gather_coefficients,
    mean_flat,
    noise_like,
    scale_module,
    zero_module,
)

TABLE = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)


# --- extract_into_tensor / gather_coefficients ------------------------------------------------------------------


def test_extract_into_tensor_golden():
    t = torch.tensor([3, 0, 2])
    out = extract_into_tensor(TABLE, t, (3, 4, 5, 6))
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [0.0625, 0.5, 0.125]
    assert extract_into_tensor(TABLE, t, (3,)).shape == (3,)


def test_extract_into_tensor_matches_seed_expression():
    a = torch.linspace(0.1, 1.0, 50)
    t = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(0))
    x_shape = (7, 3, 8, 8)
    seed = a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
    assert torch.equal(extract_into_tensor(a, t, x_shape), seed)


def test_gather_coefficients_float32_and_shape():
    t = torch.tensor([1, 3])
    out = gather_coefficients(TABLE, t, 4)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [0.25, 0.0625]
    assert gather_coefficients(TABLE, t, 2, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    ("a", "t", "x_shape", "error", "match"),
    [
        (TABLE, torch.tensor([4]), (1, 2), ValueError, r"t holds timestep 4, outside the valid range \[0, 3\]"),
        (TABLE, torch.tensor([-1, 2]), (2, 2), ValueError, r"t holds timestep -1, outside the valid range \[0, 3\]"),
        (TABLE, torch.tensor([[1]]), (1, 2), ValueError, r"t must be 1-D .* got shape \(1, 1\)"),
        (TABLE, torch.tensor([1.0]), (1, 2), TypeError, r"t must hold integer timesteps \(torch.long or torch.int32\)"),
        (TABLE, torch.tensor([True]), (1, 2), TypeError, "t must hold integer timesteps"),
        (TABLE, [1, 2], (2, 2), TypeError, "t must be a torch.Tensor of integer timesteps, got list"),
        (TABLE.view(2, 2), torch.tensor([1]), (1, 2), ValueError, r"a must be a 1-D tensor .* got \(2, 2\)"),
        (np.zeros(4), torch.tensor([1]), (1, 2), ValueError, "a must be a 1-D tensor .* got ndarray"),
        (TABLE, torch.tensor([1]), (), ValueError, r"x_shape must have at least one dimension .* got \(\)"),
    ],
)
def test_extract_into_tensor_errors(a, t, x_shape, error, match):
    with pytest.raises(error, match=match):
        extract_into_tensor(a, t, x_shape)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_small_integer_timesteps_are_refused_at_the_check(dtype):
    with pytest.raises(TypeError, match=r"torch\.long"):
        extract_into_tensor(TABLE, torch.tensor([1], dtype=dtype), (1, 2))


def test_check_timesteps_accepts_valid_and_empty():
    check_timesteps(torch.tensor([0, 999]), 1000)
    check_timesteps(torch.zeros(0, dtype=torch.long), 1)
    check_timesteps(torch.tensor([5], dtype=torch.int32), 6, name="ts")
    with pytest.raises(ValueError, match=r"ts holds timestep 6, outside the valid range \[0, 5\] of a 6-step table"):
        check_timesteps(torch.tensor([6], dtype=torch.int32), 6, name="ts")


# --- zero_module / scale_module --------------------------------------------------------------------------------------


def module_with_buffers() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m[1].running_mean.fill_(0.5)
    m[1].running_var.fill_(2.0)
    return m


def test_zero_module_zeroes_parameters_leaves_buffers():
    m = module_with_buffers()
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    assert zero_module(m) is m
    assert all(torch.count_nonzero(p) == 0 for p in m.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in m.named_buffers())
    assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_scale_module_scales_parameters_leaves_buffers():
    m = module_with_buffers()
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    assert scale_module(m, 0.5) is m
    for k, v in m.named_parameters():
        assert torch.equal(v.detach(), params[k] * 0.5)
    assert all(torch.equal(v, buffers[k]) for k, v in m.named_buffers())


# --- mean_flat ----------------------------------------------------------------------------------------------------


def test_mean_flat_golden():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    expected = np.arange(24, dtype=np.float64).reshape(2, -1).mean(axis=1)
    assert mean_flat(x).tolist() == expected.tolist()  # [5.5, 17.5]
    assert mean_flat(torch.ones(3, 1, 1)).tolist() == [1.0, 1.0, 1.0]


def test_mean_flat_one_d_is_per_sample():
    x = torch.tensor([1.0, 2.0, 6.0])
    out = mean_flat(x)
    assert out.tolist() == [1.0, 2.0, 6.0]  # CompVis gives the scalar 3.0
    assert out.data_ptr() != x.data_ptr()  # a copy, like every other rank's result
    assert x.mean(dim=list(range(1, x.ndim))).ndim == 0  # the torch quirk CompVis inherits


def test_mean_flat_zero_d_error():
    with pytest.raises(ValueError, match="mean_flat needs a batch dimension; got a 0-d tensor"):
        mean_flat(torch.tensor(1.0))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_property_mean_flat_matches_numpy(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    np.testing.assert_allclose(mean_flat(x).numpy(), x.numpy().reshape(shape[0], -1).mean(axis=1), rtol=1e-12)


# --- avg_pool_nd --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "cls"), [(1, nn.AvgPool1d), (2, nn.AvgPool2d), (3, nn.AvgPool3d)])
def test_avg_pool_nd(dims, cls):
    pool = avg_pool_nd(dims, kernel_size=2, stride=2)
    assert type(pool) is cls
    size = [4] if dims == 1 else [2] * dims
    x = torch.arange(float(np.prod(size))).reshape(1, 1, *size)
    expected = [0.5, 2.5] if dims == 1 else [np.arange(2**dims).mean()]
    assert pool(x).flatten().tolist() == expected


@pytest.mark.parametrize("dims", [0, 4, -1, True, "2", None, 1.0, [1]])
def test_avg_pool_nd_errors(dims):
    with pytest.raises(ValueError, match=re.escape(f"unsupported dimensions: dims={dims!r}; expected 1, 2 or 3")):
        avg_pool_nd(dims, 2)


# --- noise_like ---------------------------------------------------------------------------------------------------


def test_noise_like_is_randn():
    torch.manual_seed(3)
    expected = torch.randn(4, 2, 3)
    torch.manual_seed(3)
    out = noise_like((4, 2, 3), "cpu")
    assert torch.equal(out, expected) and out.dtype == torch.get_default_dtype()


def test_noise_like_repeat_tiles_one_sample():
    torch.manual_seed(5)
    one = torch.randn(1, 2, 3)
    torch.manual_seed(5)
    out = noise_like((4, 2, 3), torch.device("cpu"), repeat=True)
    assert out.shape == (4, 2, 3)
    assert all(torch.equal(out[i], one[0]) for i in range(4))


def test_noise_like_dtype_and_generator():
    a = noise_like([3, 5], "cpu", dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    b = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert a.dtype == torch.float64 and torch.equal(a, b)
    r = noise_like([3, 5], "cpu", repeat=True, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(9))
    one = torch.randn(1, 5, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(9))
    assert r.dtype == torch.bfloat16 and torch.equal(r, one.expand(3, 5))
    state = torch.get_rng_state()
    noise_like([2], "cpu", generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched with a generator


def test_noise_like_repeat_needs_batch():
    with pytest.raises(ValueError, match=r"noise_like\(repeat=True\) needs a batch dimension; got shape \(\)"):
        noise_like((), "cpu", repeat=True)
    assert noise_like((), "cpu").shape == ()


def test_noise_like_errors():
    with pytest.raises(TypeError, match=r"dtype=torch.int64 is not a floating dtype"):
        noise_like((2, 3), "cpu", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"shape=\(2, -1\) has a negative size"):
        noise_like((2, -1), "cpu")
    with pytest.raises(TypeError, match=r"shape\[1\] must be an integer, got 2.7 of type float"):  # issue 13, point 7
        noise_like((2, 2.7), "cpu")
    with pytest.raises(TypeError, match=r"shape\[0\] must be an integer, got True of type bool"):
        noise_like((True, 3), "cpu")
