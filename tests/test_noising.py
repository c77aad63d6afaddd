import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ldm.noising import (
    combine,
    get_v,
    predict_noise_from_v,
    predict_start_from_noise,
    predict_start_from_v,
    q_sample,
)

T = 1000
# Stable Diffusion's schedule (CompVis' "linear" = diffusers' "scaled_linear"), in float64 with numpy
BETAS = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
AC = np.cumprod(1.0 - BETAS)
TABLES64 = {
    "sqrt_ac": np.sqrt(AC),
    "sqrt_1m_ac": np.sqrt(1.0 - AC),
    "sqrt_recip": np.sqrt(1.0 / AC),
    "sqrt_recipm1": np.sqrt(1.0 / AC - 1.0),
}
TABLES = {k: torch.from_numpy(v).float() for k, v in TABLES64.items()}


def sample(shape=(6, 3, 4, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def expand(values: np.ndarray, t: torch.Tensor, ndim: int) -> np.ndarray:
    return values[t.numpy()].reshape(-1, *([1] * (ndim - 1)))


T_TEST = torch.tensor([0, 1, 10, 500, 998, 999])


def test_q_sample_golden():
    x0, eps = sample()
    out = q_sample(x0, T_TEST, eps, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
    a = expand(TABLES64["sqrt_ac"], T_TEST, 4)
    b = expand(TABLES64["sqrt_1m_ac"], T_TEST, 4)
    expected = a * x0.double().numpy() + b * eps.double().numpy()
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    ("func", "tables", "formula"),
    [
        (predict_start_from_noise, ("sqrt_recip", "sqrt_recipm1"), lambda a, b, x, y: a * x - b * y),
        (get_v, ("sqrt_ac", "sqrt_1m_ac"), lambda a, b, x, y: a * y - b * x),
        (predict_start_from_v, ("sqrt_ac", "sqrt_1m_ac"), lambda a, b, x, y: a * x - b * y),
        (predict_noise_from_v, ("sqrt_ac", "sqrt_1m_ac"), lambda a, b, x, y: a * y + b * x),
    ],
)
def test_identities_golden(func, tables, formula):
    x, y = sample(seed=1)
    if func is get_v:  # get_v(x_start, noise, t, ...)
        out = func(x, y, T_TEST, TABLES[tables[0]], TABLES[tables[1]])
    else:  # f(x_t, t, other, ...)
        out = func(x, T_TEST, y, TABLES[tables[0]], TABLES[tables[1]])
    a = expand(TABLES64[tables[0]], T_TEST, 4)
    b = expand(TABLES64[tables[1]], T_TEST, 4)
    expected = formula(a, b, x.double().numpy(), y.double().numpy())
    # sqrt(1/ā) reaches ~14.6 at t = 999: float32 rounding of the coefficient scales with it
    atol = 2e-5 if func is predict_start_from_noise else 2e-6
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=atol)


@settings(max_examples=30, deadline=None)
@given(t=st.lists(st.integers(0, T - 1), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_property_round_trips(t, seed):
    ts = torch.tensor(t)
    x0, eps = sample((len(t), 2, 3), seed=seed, dtype=torch.float64)
    tab = {k: torch.from_numpy(v) for k, v in TABLES64.items()}  # float64 tables: round trips to ~1e-6
    x_t = q_sample(x0, ts, eps, tab["sqrt_ac"], tab["sqrt_1m_ac"])
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(
        predict_start_from_noise(x_t, ts, eps, tab["sqrt_recip"], tab["sqrt_recipm1"]), x0, rtol=0, atol=1e-5
    )
    v = get_v(x0, eps, ts, tab["sqrt_ac"], tab["sqrt_1m_ac"])
    torch.testing.assert_close(
        predict_start_from_v(x_t, ts, v, tab["sqrt_ac"], tab["sqrt_1m_ac"]), x0, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        predict_noise_from_v(x_t, ts, v, tab["sqrt_ac"], tab["sqrt_1m_ac"]), eps, atol=1e-5, rtol=0
    )


def test_combine_sign_and_dtype():
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    y = torch.full((2, 3), 2.0, dtype=torch.bfloat16)
    a = torch.tensor([0.5, 0.25])
    b = torch.tensor([1.0, 0.75], dtype=torch.float64)
    out = combine(torch.tensor([1, 0]), a, x, b, y, sign=-1.0)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[0.25 - 1.5] * 3, [0.5 - 2.0] * 3]


def test_unchecked_combine_gives_the_same_numbers():
    x0, eps = sample()
    a = q_sample(x0, T_TEST, eps, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
    b = combine(T_TEST, TABLES["sqrt_ac"], x0, TABLES["sqrt_1m_ac"], eps)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_samples_get_correct_noise_at_small_t(dtype):
    x0, eps = sample((6, 4, 8, 8), seed=5, dtype=dtype)
    t = torch.tensor([0, 1, 0, 1, 10, 10])
    out = q_sample(x0, t, eps, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
    assert out.dtype == dtype
    a = expand(TABLES64["sqrt_ac"], t, 4)
    b = expand(TABLES64["sqrt_1m_ac"], t, 4)
    exact = torch.from_numpy(a * x0.double().numpy() + b * eps.double().numpy())
    # the float32 computation rounds to the nearest half-precision value, or the next one (double rounding)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - exact).abs() <= ulp).all()
    # the noise is really there: at t = 0 the noise term is √(1−ā_0)·ε ≈ 0.029·ε
    assert not torch.equal(out[:4], x0[:4])


# --- errors -------------------------------------------------------------------------------------------------------

CALLS = {
    "q_sample": lambda x, t, y: q_sample(x, t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]),
    "predict_start_from_noise": lambda x, t, y: predict_start_from_noise(
        x, t, y, TABLES["sqrt_recip"], TABLES["sqrt_recipm1"]
    ),
    "get_v": lambda x, t, y: get_v(x, y, t, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]),
    "predict_start_from_v": lambda x, t, y: predict_start_from_v(x, t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]),
    "predict_noise_from_v": lambda x, t, y: predict_noise_from_v(x, t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize(
    ("t", "x_shape", "y_shape", "error", "match"),
    [
        (torch.tensor([1000, 0]), (2, 3), (2, 3), ValueError, r"t holds timestep 1000, outside .* \[0, 999\]"),
        (torch.tensor([-1, 0]), (2, 3), (2, 3), ValueError, r"t holds timestep -1"),
        (torch.tensor([1.0, 0.0]), (2, 3), (2, 3), TypeError, "t must hold integer timesteps"),
        (torch.tensor([[1, 0]]), (2, 3), (2, 3), ValueError, "t must be 1-D"),
        (
            torch.tensor([1, 0, 2]),
            (2, 3),
            (2, 3),
            ValueError,
            r"t has 3 timesteps but (x_start|x_t) has batch size 2",
        ),
        (
            torch.tensor([1, 0]),
            (2, 3),
            (2, 4),
            ValueError,
            r"(x_start|x_t) and (noise|v) must have the same shape, got \(2, 3\) and \(2, 4\)",
        ),
    ],
)
def test_errors(name, t, x_shape, y_shape, error, match):
    with pytest.raises(error, match=match):
        CALLS[name](torch.zeros(x_shape), t, torch.zeros(y_shape))


@pytest.mark.parametrize("name", list(CALLS))
def test_tables_of_different_lengths_are_refused(name):
    short = {k: v[:500] for k, v in TABLES.items()}
    calls = {
        "q_sample": lambda: q_sample(_X, _T, _Y, TABLES["sqrt_ac"], short["sqrt_1m_ac"]),
        "predict_start_from_noise": lambda: predict_start_from_noise(
            _X, _T, _Y, TABLES["sqrt_recip"], short["sqrt_recipm1"]
        ),
        "get_v": lambda: get_v(_X, _Y, _T, TABLES["sqrt_ac"], short["sqrt_1m_ac"]),
        "predict_start_from_v": lambda: predict_start_from_v(_X, _T, _Y, TABLES["sqrt_ac"], short["sqrt_1m_ac"]),
        "predict_noise_from_v": lambda: predict_noise_from_v(_X, _T, _Y, TABLES["sqrt_ac"], short["sqrt_1m_ac"]),
    }
    with pytest.raises(
        ValueError, match=r"coefficient tables must be 1-D and of one length, got shapes \(1000,\) and \(500,\)"
    ):
        calls[name]()


_X, _Y, _T = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([999, 0])


# ------------------------------------------------------------------------------ the eager forms, bit for bit
def _reference(t: torch.Tensor, a: torch.Tensor, x: torch.Tensor, b: torch.Tensor, y: torch.Tensor, sign: float):
    """CompVis' ``extract_into_tensor(a, t, x.shape) * x ± extract_into_tensor(b, t, x.shape) * y``, then the cast."""
    shape = (t.shape[0],) + (1,) * (x.ndim - 1)
    ax = a.gather(-1, t).reshape(shape) * x
    by = b.gather(-1, t).reshape(shape) * y
    return (ax + by if sign == 1.0 else ax - by).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("shape", [(8, 4, 16, 16), (3, 5), (1, 2, 3, 4, 5)])
def test_combine_is_the_reference_formula_bitwise(dtype: torch.dtype, sign: float, shape: tuple[int, ...]) -> None:
    x, y = sample(shape, seed=7, dtype=dtype)
    t = torch.randint(0, T, (shape[0],), generator=torch.Generator().manual_seed(3))
    a, b = TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]
    out = combine(t, a, x, b, y, sign)
    assert out.dtype == dtype
    assert torch.equal(out, _reference(t, a, x, b, y, sign))
    # views and non-contiguous inputs take the same path and give the same bits
    xt, yt = x.transpose(0, -1).contiguous().transpose(0, -1), y.transpose(0, -1).contiguous().transpose(0, -1)
    assert not xt.is_contiguous() or len(shape) == 2
    assert torch.equal(combine(t, a, xt, b, yt, sign), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_leaves_its_inputs_alone_and_keeps_gradients(dtype: torch.dtype) -> None:
    x, y = sample((4, 3, 8), seed=1, dtype=dtype)
    x0, y0 = x.clone(), y.clone()
    t = torch.tensor([0, 1, 500, 999])
    out = q_sample(x, t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
    assert torch.equal(x, x0) and torch.equal(y, y0)
    xg = x.clone().requires_grad_(True)
    q_sample(xg, t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]).float().sum().backward()
    expected = TABLES["sqrt_ac"][t].view(-1, 1, 1).expand(x.shape).to(dtype)
    assert torch.equal(xg.grad, expected)
    assert torch.equal(q_sample(xg.detach(), t, y, TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"]), out)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.full((2, 3), 200, dtype=torch.uint8), r"x_start must be a floating tensor.*torch.uint8"),
        (torch.ones(2, 3, dtype=torch.bool), r"x_start must be a floating tensor.*torch.bool"),
        (torch.ones(2, 3, dtype=torch.complex64), r"x_start must be a floating tensor.*torch.complex64"),
        (torch.ones(2, 3, dtype=torch.int64), r"x_start must be a floating tensor.*torch.int64"),
    ],
)
def test_q_sample_refuses_non_floating_samples(bad: torch.Tensor, match: str) -> None:
    t = torch.tensor([0, 5])
    with pytest.raises(TypeError, match=match):
        q_sample(bad, t, torch.zeros(2, 3), TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
    with pytest.raises(TypeError, match=r"noise must be a floating tensor.*torch.int64"):
        q_sample(torch.zeros(2, 3), t, torch.zeros(2, 3, dtype=torch.int64), TABLES["sqrt_ac"], TABLES["sqrt_1m_ac"])
