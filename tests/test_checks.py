"""The validation layer: each helper's accepted values, its errors and their messages, and describe()."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lightning_ldm._checks import (
    check_betas,
    check_bool,
    check_callable,
    check_choice,
    check_floating,
    check_instance,
    check_int,
    check_mapping,
    check_real,
    check_same_shape,
    check_scheduler,
    check_scheduler_steps,
    check_shape,
    check_str,
    check_tensor,
    check_timestep_list,
    check_timesteps,
    check_value_range,
    describe,
)


# ------------------------------------------------------------------------------------------------------ describe
def test_describe_summarises_a_big_tensor_in_one_short_line() -> None:
    big = torch.arange(10_000, dtype=torch.float32).reshape(100, 100) - 17.5
    text = describe(big)
    assert text == "a tensor of shape (100, 100), dtype torch.float32, min -17.5, max 9981.5"
    assert len(text) < 100 and "\n" not in text
    long_int = torch.arange(10_000)
    assert describe(long_int) == "a tensor of shape (10000,), dtype torch.int64, min 0, max 9999"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.ones(10_000, dtype=torch.bool), "a tensor of shape (10000,), dtype torch.bool"),
        (torch.ones(3, dtype=torch.complex64), "a tensor of shape (3,), dtype torch.complex64"),
        (torch.empty(0, 4), "a tensor of shape (0, 4), dtype torch.float32"),
        (torch.empty(5, device="meta"), "a tensor of shape (5,), dtype torch.float32, on meta"),
        (np.zeros((3, 2), dtype=np.float16), "an array of shape (3, 2), dtype float16"),
        ("linear", "'linear'"),
        (None, "None"),
    ],
)
def test_describe_other_values(value: Any, expected: str) -> None:
    assert describe(value) == expected


def test_describe_cuts_long_reprs() -> None:
    text = describe(list(range(10_000)))
    assert len(text) < 100 and text.startswith("[0, 1, 2,") and text.endswith("... (list)")


# ------------------------------------------------------------------------------------------------- check_choice
def test_check_choice() -> None:
    check_choice("mode", "b", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode='c' is not supported; expected one of 'a', 'b'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode=1 is not supported; expected one of 'a', 'b'$"):
        check_choice("mode", 1, ["a", "b"])


# --------------------------------------------------------------------------------------------------- check_bool
def test_check_bool_accepts_python_and_numpy_bools() -> None:
    assert check_bool("flag", True) is True
    assert check_bool("flag", np.bool_(False)) is False
    assert check_bool("flag", np.array([True])[0]) is True


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1, r"^flag must be a bool, got 1 of type int$"),
        ("True", r"^flag must be a bool, got 'True' of type str$"),
        (None, r"^flag must be a bool, got None of type NoneType$"),
        (torch.tensor(True), r"^flag must be a bool, got a tensor of shape \(\), dtype torch.bool of type Tensor$"),
    ],
)
def test_check_bool_refuses_other_types(value: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        check_bool("flag", value)


# ------------------------------------------------------------ check_instance, check_str, check_callable, check_mapping
def test_check_instance_returns_the_value_of_an_accepted_type() -> None:
    module = torch.nn.Identity()
    assert check_instance("m", module, torch.nn.Module, "an nn.Module") is module
    assert check_instance("x", 3, (int, float), "a number") == 3


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("net", r"^m must be an nn.Module with forward, got 'net' of type str$"),
        (torch.nn.Linear, r"^m must be an nn.Module with forward, got <class 'torch.nn.modules.linear.Linear'> of"),
        (torch.ones(2, 3), r"^m must be an nn.Module with forward, got a tensor of shape \(2, 3\), dtype torch.float"),
    ],
)
def test_check_instance_names_the_argument_the_value_and_what_is_accepted(value: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        check_instance("m", value, torch.nn.Module, "an nn.Module with forward")


def test_check_str() -> None:
    assert check_str("tag", "samples") == "samples"
    assert check_str("tag", "") == ""
    with pytest.raises(TypeError, match=r"^tag must be a string, got 3 of type int$"):
        check_str("tag", 3)
    with pytest.raises(TypeError, match=r"^tag must be a string, got b'x' of type bytes$"):
        check_str("tag", b"x", nonempty=True)
    with pytest.raises(ValueError, match=r"^tag must be a non-empty string, got ''$"):
        check_str("tag", "", nonempty=True)
    with pytest.raises(TypeError, match=r"^target must be a dotted path, got None of type NoneType$"):
        check_str("target", None, what="a dotted path")


def test_check_callable() -> None:
    assert check_callable("f", len) is len
    with pytest.raises(TypeError, match=r"^f must be callable, got 1.5 of type float$"):
        check_callable("f", 1.5)
    with pytest.raises(TypeError, match=r"^f must be callable as f\(x\), got \[1, 2\] of type list$"):
        check_callable("f", [1, 2], "callable as f(x)")


def test_check_mapping() -> None:
    given = {"a": 1}
    assert check_mapping("options", given) is given
    proxy = MappingProxyType(given)  # any Mapping, not only dict
    assert check_mapping("options", proxy) is proxy
    with pytest.raises(TypeError, match=r"^options must be a mapping, got \[\('a', 1\)\] of type list$"):
        check_mapping("options", [("a", 1)])
    with pytest.raises(TypeError, match=r"^options must be a mapping of sample\(\) options, got 'a=1' of type str$"):
        check_mapping("options", "a=1", "a mapping of sample() options")


# ------------------------------------------------------------------------------ check_value_range, check_timestep_list
def test_check_value_range() -> None:
    assert check_value_range((0, 255)) == (0.0, 255.0) and check_value_range([-1.0, 1.0]) == (-1.0, 1.0)
    with pytest.raises(TypeError, match=r"^value_range must be a pair \(low, high\) of real numbers, got \(0.0,\)$"):
        check_value_range((0.0,))
    with pytest.raises(TypeError, match=r"^span must be a pair \(low, high\) of real numbers, got '01'$"):
        check_value_range("01", "span")
    with pytest.raises(TypeError, match=r"^span\[1\] must be a real number, got 'x' of type str$"):
        check_value_range((0, "x"), "span")
    with pytest.raises(ValueError, match=r"^value_range=\(2, -1\) is empty; expected low < high$"):
        check_value_range((2.0, -1.0))


def test_check_timestep_list() -> None:
    assert check_timestep_list([3, np.int64(0), 7], 8) == (3, 0, 7)
    assert check_timestep_list(range(2)) == (0, 1)
    with pytest.raises(TypeError, match=r"^timesteps must be a sequence of integers, got Tensor$"):
        check_timestep_list(torch.tensor([1]))
    with pytest.raises(TypeError, match=r"^grid must be a sequence of integers, got str$"):
        check_timestep_list("12", name="grid")
    with pytest.raises(TypeError, match=r"^timesteps\[1\] must be an integer, got 1.5 of type float$"):
        check_timestep_list([0, 1.5])
    with pytest.raises(ValueError, match=r"^timesteps\[1\]=8 is out of range; expected an integer in \[0, 7\]$"):
        check_timestep_list([0, 8], 8)
    with pytest.raises(ValueError, match=r"^timesteps must hold at least one timestep, got an empty sequence$"):
        check_timestep_list([])
    with pytest.raises(ValueError, match=r"^timesteps must be distinct, got \[2\] more than once$"):
        check_timestep_list([2, 1, 2])


# ---------------------------------------------------------------------------------------------------- check_int
def test_check_int() -> None:
    assert check_int("n", np.int64(7), minimum=0) == 7 and type(check_int("n", np.int32(7))) is int
    for value in (True, np.bool_(True), 2.0, "2", None):
        with pytest.raises(TypeError, match=r"^n must be an integer, got .* of type "):
            check_int("n", value)
    with pytest.raises(ValueError, match=r"^n=-1 is out of range; expected an integer >= 0$"):
        check_int("n", -1, minimum=0)
    with pytest.raises(ValueError, match=r"^n=11 is out of range; expected an integer <= 10$"):
        check_int("n", 11, maximum=10)
    with pytest.raises(ValueError, match=r"^n=11 is out of range; expected an integer in \[1, 10\]$"):
        check_int("n", 11, minimum=1, maximum=10)
    with pytest.raises(ValueError, match=r"^n=0 is out of range; expected an integer in \[1, 10\]$"):
        check_int("n", 0, minimum=1, maximum=10)


# --------------------------------------------------------------------------------------------------- check_real
def test_check_real() -> None:
    assert check_real("x", 1) == 1.0 and type(check_real("x", 1)) is float
    assert check_real("x", np.float32(0.5), minimum=0.0, maximum=1.0) == 0.5
    assert check_real("x", 0.0, minimum=0.0) == 0.0  # inclusive by default
    for value in (True, "1.0", None, torch.tensor(1.0), 1j):
        with pytest.raises(TypeError, match=r"^x must be a real number, got .* of type "):
            check_real("x", value)
    with pytest.raises(ValueError, match=r"^x=nan must be finite; expected a number in \[0, 1\]$"):
        check_real("x", float("nan"), minimum=0.0, maximum=1.0)
    with pytest.raises(ValueError, match=r"^x=-inf must be finite; expected a number in \[-inf, inf\]$"):
        check_real("x", float("-inf"))
    with pytest.raises(ValueError, match=r"^x=0 is out of range; expected a number in \(0, inf\]$"):
        check_real("x", 0.0, minimum=0.0, min_inclusive=False)
    with pytest.raises(ValueError, match=r"^x=1 is out of range; expected a number in \[0, 1\)$"):
        check_real("x", 1.0, minimum=0.0, maximum=1.0, max_inclusive=False)
    with pytest.raises(ValueError, match=r"^x=1.5 is out of range; expected a number in \[-inf, 1\]$"):
        check_real("x", 1.5, maximum=1.0)


# ------------------------------------------------------------------------------------ tensors, dtypes, shapes
def test_check_tensor_and_check_floating() -> None:
    x = torch.ones(2, 3)
    assert check_tensor("x", x) is x and check_floating("x", x, min_ndim=2) is x
    assert check_floating("x", torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got ndarray$"):
        check_tensor("x", np.ones(2))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list$"):
        check_floating("x", [1.0])
    for bad in (torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.complex64)):
        with pytest.raises(
            TypeError, match=rf"^x must be a floating tensor \(e.g. .*\), got a tensor of .*{bad.dtype}"
        ):
            check_floating("x", bad)
    with pytest.raises(ValueError, match=r"^x must have a batch dimension, got shape \(\)$"):
        check_floating("x", torch.tensor(1.0), min_ndim=1)
    with pytest.raises(ValueError, match=r"^x must have at least 4 dimensions, got shape \(2, 3\)$"):
        check_floating("x", x, min_ndim=4)


def test_check_same_shape() -> None:
    check_same_shape("a", torch.ones(2, 3), "b", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^a and b must have the same shape, got \(2, 3\) and \(3, 2\)$"):
        check_same_shape("a", torch.ones(2, 3), "b", torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------- check_timesteps
def test_check_timesteps_accepts_long_and_int32_and_returns_t() -> None:
    t = torch.tensor([0, 9], dtype=torch.int32)
    assert check_timesteps(t, 10) is t
    empty = torch.zeros(0, dtype=torch.long)
    assert check_timesteps(empty, 10, batch=0) is empty


@pytest.mark.parametrize("size", [8, 256, 257, 5000])  # the small path reads a list, the large one reduces
def test_check_timesteps_names_the_first_offending_index(size: int) -> None:
    t = torch.full((size,), 3, dtype=torch.long)
    t[size // 2] = 12
    t[-1] = -4
    with pytest.raises(
        ValueError,
        match=rf"^t holds timestep 12, outside the valid range \[0, 9\] of a 10-step table \(first at index "
        rf"{size // 2}; t is a tensor of shape \({size},\), dtype torch.int64, min -4, max 12\)$",
    ):
        check_timesteps(t, 10)
    t[0] = 10
    with pytest.raises(ValueError, match=r"^steps holds timestep 10, .*\(first at index 0; steps is a tensor"):
        check_timesteps(t, 10, name="steps")


@pytest.mark.parametrize(
    ("t", "kwargs", "error", "match"),
    [
        ([1, 2], {}, TypeError, r"^t must be a torch.Tensor of integer timesteps, got list$"),
        (
            torch.tensor([1.0]),
            {},
            TypeError,
            r"^t must hold integer timesteps \(torch.long or torch.int32\), got dtype ",
        ),
        (torch.tensor([1], dtype=torch.uint8), {}, TypeError, r"got dtype torch.uint8$"),
        (torch.tensor(3), {}, ValueError, r"^t must be 1-D with one timestep per sample, got shape \(\)$"),
        (torch.ones(2, 2, dtype=torch.long), {}, ValueError, r"got shape \(2, 2\)$"),
        (
            torch.tensor([1, 2]),
            {"batch": 3, "batch_of": "x_start"},
            ValueError,
            r"^t has 2 timesteps but x_start has batch size 3$",
        ),
        (torch.tensor([1, 2]), {"batch": 3}, ValueError, r"^t has 2 timesteps but the samples has batch size 3$"),
    ],
)
def test_check_timesteps_refuses(t: Any, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_timesteps(t, 10, **kwargs)


def test_check_timesteps_skips_the_host_read_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    t = torch.tensor([99])
    assert check_timesteps(t, 10) is t  # the range needs a host read: skipped
    with pytest.raises(TypeError, match=r"got dtype torch.float32"):  # dtype and shape checks are static: kept
        check_timesteps(torch.tensor([1.0]), 10)


# --------------------------------------------------------------------------------------------------- check_betas
def test_check_betas_converts_every_input_to_a_fresh_float64_array() -> None:
    source = np.array([0.1, 0.2], dtype=np.float32)
    for betas in (source, torch.tensor([0.1, 0.2]), [0.1, 0.2], (0.1, 0.2)):
        out = check_betas(betas)
        assert out.dtype == np.float64 and out.shape == (2,) and out.flags.c_contiguous
        np.testing.assert_allclose(out, [0.1, 0.2], rtol=1e-7)
    out = check_betas(source)
    out[0] = 0.9
    assert source[0] == np.float32(0.1)  # a copy
    assert check_betas([0.1, 1.0])[-1] == 1.0  # a zero-terminal-SNR end


@pytest.mark.parametrize(
    ("betas", "kwargs", "error", "match"),
    [
        ("0.1", {}, TypeError, r"^betas must be a 1-D sequence, numpy array or tensor of betas, got str$"),
        ({"a": 0.1}, {}, TypeError, r"got dict$"),
        ([0.1, "x"], {}, TypeError, r"^betas must be a 1-D sequence, numpy array or tensor of real numbers, got "),
        (
            torch.ones(2, dtype=torch.bool),
            {},
            TypeError,
            r"^betas must hold real numbers, got a tensor of shape \(2,\)",
        ),
        (torch.ones(2, dtype=torch.complex64), {}, TypeError, r"^betas must hold real numbers"),
        (
            [[0.1, 0.2]],
            {},
            ValueError,
            r"^betas must be a 1-D array of at least 1 per-timestep betas, got shape \(1, 2\)",
        ),
        ([], {}, ValueError, r"got shape \(0,\)$"),
        ([0.1], {"min_length": 2}, ValueError, r"at least 2 per-timestep betas, got shape \(1,\)$"),
        (
            [0.1, float("inf"), float("nan")],
            {},
            ValueError,
            r"^betas\[1\]=inf is not finite; expected betas in \[0, 1\)$",
        ),
        (
            [0.1, 0.2, -0.3, 2.0],
            {},
            ValueError,
            r"^betas\[2\]=-0.3 lies outside \[0, 1\) \(only the last beta may be 1: a zero-terminal-SNR schedule\)$",
        ),
        ([0.1, 1.0], {"allow_terminal_one": False}, ValueError, r"^betas\[1\]=1.0 lies outside \[0, 1\)$"),
        ([1.0, 0.1], {}, ValueError, r"^betas\[0\]=1.0 lies outside \[0, 1\) \(only the last"),
        (
            [0.1, 1.5],
            {"name": "given_betas", "context": "make_beta_schedule('sqrt', 2)"},
            ValueError,
            r"^make_beta_schedule\('sqrt', 2\): beta\[1\]=1.5 lies outside",
        ),
    ],
)
def test_check_betas_refuses(betas: Any, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_betas(betas, **kwargs)


# ------------------------------------------------------------------- check_shape (issue 13, point 7: no truncation)
def test_check_shape_returns_python_ints() -> None:
    assert check_shape("shape", (2, 4, 4)) == (2, 4, 4)
    assert check_shape("shape", [np.int64(3), 1]) == (3, 1)
    size = check_shape("shape", torch.Size([5, 2]))
    assert size == (5, 2) and type(size) is tuple and all(type(s) is int for s in size)
    assert check_shape("shape", (), min_ndim=0, minimum=None) == ()
    assert check_shape("shape", (2, 0), minimum=None) == (2, 0)


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "match"),
    [
        ((2.7, 2, 4, 4), {}, TypeError, r"shape\[0\] must be an integer, got 2.7 of type float"),
        ((2, 4.9), {}, TypeError, r"shape\[1\] must be an integer, got 4.9 of type float"),
        ((2, 4.0), {}, TypeError, r"shape\[1\] must be an integer, got 4.0 of type float"),
        ((2, True), {}, TypeError, r"shape\[1\] must be an integer, got True of type bool"),
        ((2, torch.tensor(3)), {}, TypeError, r"shape\[1\] must be an integer, got a tensor of shape \(\)"),
        ("4x4", {}, TypeError, r"shape must be a sequence of positive integers, got str"),
        (4, {}, TypeError, r"shape must be a sequence of positive integers, got int"),
        (torch.zeros(2), {}, TypeError, r"shape must be a sequence of positive integers, got Tensor"),
        ((), {}, ValueError, r"shape must have a batch axis, got \(\)"),
        ((4,), {"min_ndim": 2}, ValueError, r"shape must have a batch axis and at least one more, got \(4,\)"),
        ((4, 1), {"min_ndim": 4}, ValueError, r"shape must have a batch axis and at least 3 more, got \(4, 1\)"),
        ((0, 2), {}, ValueError, r"shape must start with a positive batch size, got \(0, 2\)"),
        ((2, 0, 3), {}, ValueError, r"shape\[1\]=0 is out of range; expected an integer >= 1"),
    ],
)
def test_check_shape_refuses(value: Any, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_shape("shape", value, **kwargs)


# --------------------------------------------------- check_scheduler with duck-typed schedulers (issue 13, point 5)
class _Sched:
    """A scheduler with a diffusers-like ``config``, ``alphas_cumprod`` and ``timesteps``."""

    def __init__(self, alphas_cumprod: Any = None, repeat_from: int | None = None, **config: Any) -> None:
        self.config = config
        if alphas_cumprod is not None:
            self.alphas_cumprod = alphas_cumprod
        self.repeat_from = repeat_from
        self.timesteps = torch.zeros(0)

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        if num_inference_steps > 50:
            raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than 50")
        steps = torch.arange(num_inference_steps, 0, -1)
        if self.repeat_from is not None and num_inference_steps >= self.repeat_from:
            steps[1] = steps[0]
        self.timesteps = steps

    def step(self, *args: Any) -> None:
        pass


def _schedule(parameterization: str = "eps", size: int = 10) -> SimpleNamespace:
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.2, size))
    return SimpleNamespace(tables_float64={"alphas_cumprod": abar}, parameterization=parameterization)


def test_check_scheduler_accepts_a_float32_copy_of_the_table() -> None:
    schedule = _schedule("v")
    table = torch.from_numpy(schedule.tables_float64["alphas_cumprod"]).float()
    check_scheduler(_Sched(table, num_train_timesteps=10, prediction_type="v_prediction"), schedule, 5)
    check_scheduler(_Sched(table + 9e-6), schedule)  # just inside the tolerance; no config: nothing else to compare
    check_scheduler(_Sched(), schedule, 50)  # no table, no config: only the protocol and the steps are checked


@pytest.mark.parametrize(
    ("scheduler", "match"),
    [
        (
            _Sched(prediction_type="epsilon"),
            r"scheduler _Sched has prediction_type='epsilon' but the model predicts 'v' \(prediction_type="
            r"'v_prediction'\); build it with _Sched.from_config\(module.noise_schedule.to_diffusers_config\(\)\)",
        ),
        (
            _Sched(prediction_type="flow_prediction"),
            r"prediction_type='flow_prediction' but the model predicts 'v'",
        ),
        (_Sched(num_train_timesteps=1000), r"_Sched has num_train_timesteps=1000 but the model's schedule has 10"),
        (_Sched(np.ones(12)), r"scheduler _Sched has 12 alphas_cumprod but the model's schedule has 10"),
        (
            _Sched(np.cumprod(1.0 - np.linspace(1e-4, 0.2, 10)) * np.r_[np.ones(9), 0.5]),
            r"_Sched's alphas_cumprod differs from the model's schedule: at t=9 the scheduler has 0\.1699 and the "
            r"model 0\.339799 \(\|difference\| 0\.17 > 1e-05, the float32 tolerance\)",
        ),
        (
            _Sched(np.cumprod(1.0 - np.linspace(1e-4, 0.2, 10)) + np.r_[0.0, 2e-5, np.zeros(8)]),
            r"at t=1 .* \(\|difference\| 2e-05 > 1e-05",
        ),
        (_Sched(np.full(10, np.nan)), r"at t=0 the scheduler has nan and the model 0.9999"),
    ],
)
def test_check_scheduler_refuses_another_schedule(scheduler: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_scheduler(scheduler, _schedule("v"))


def test_check_scheduler_steps_refuses_repeated_timesteps_and_wraps_set_timesteps_errors() -> None:
    sched = _Sched(repeat_from=10, num_train_timesteps=10)
    assert check_scheduler_steps(sched, 9) == 9 and sched.timesteps.tolist() == list(range(9, 0, -1))
    with pytest.raises(
        ValueError,
        match=r"num_steps=10 is more than _Sched supports on its 10 training timesteps: its timesteps repeat "
        r"\(10 twice\), so a step has size 0 and the samples come out NaN; use fewer steps",
    ):
        check_scheduler(sched, _schedule(), 10)
    with pytest.raises(
        ValueError, match=r"num_steps=51 is more than _Sched supports: `num_inference_steps`: 51 cannot be larger"
    ):
        check_scheduler_steps(_Sched(), 51)
    with pytest.raises(TypeError, match=r"num_steps must be an integer, got 2.5"):
        check_scheduler(_Sched(), None, 2.5)
    with pytest.raises(ValueError, match=r"num_steps=0 is out of range; expected an integer >= 1"):
        check_scheduler_steps(_Sched(), 0)
