"""Smoke test of the benchmarks (tiny sizes, no timing assertions) and the numbers of q_sample's fused CPU path.

The fused path of ``lightning_ldm.noising.combine`` is a ``torch.compile``d kernel. Compiling costs seconds, so these
tests swap ``torch.compile`` for the identity and check the kernel's formula and the dispatch logic; the compiled
kernel itself is checked bitwise by every full benchmark run, and by ``test_compiled_kernel_bitwise`` when
``LIGHTNING_LDM_TEST_COMPILE=1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from benchmarks.run import ROWS, main
from lightning_ldm import noising

EXPECTED_ROWS = {
    "q_sample",
    "q_sample accuracy",
    "timestep embedding",
    "gradient checkpointing",
    "AlphaBlender",
    "training step",
    "DDIM sampling",
    "resume check",
}


def test_quick_run_writes_every_row(tmp_path: Any) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    results = payload["results"]
    assert {r["row"] for r in results} == EXPECTED_ROWS
    for r in results:
        assert math.isfinite(r["value"]), r
        assert r["status"] in {"quick", "info"}, r
    meta = payload["meta"]
    assert meta["quick"] is True
    assert meta["torch_threads"] == torch.get_num_threads()
    assert set(meta["row_seconds"]) == set(ROWS)
    md = (tmp_path / "bench.md").read_text()
    assert "| row | case | compared | value | goal | status | context |" in md
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in md
    assert md.count("\n| ") == len(results) + 1  # header + one line per result


def test_unknown_row_is_refused(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--rows", "q_sample,nope", "--out", str(tmp_path)])
    assert "unknown rows ['nope']" in capsys.readouterr().err


# ------------------------------------------------------------------------------- q_sample: the fused CPU path
T = 1000


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, 0)
    return abar.sqrt().float(), (1.0 - abar).sqrt().float()


def _seed(t: torch.Tensor, a: torch.Tensor, x: torch.Tensor, b: torch.Tensor, y: torch.Tensor, sign: float) -> Any:
    """The reference's ``extract_into_tensor(a, t, x.shape) * x ± extract_into_tensor(b, t, x.shape) * y``."""
    shape = (t.shape[0],) + (1,) * (x.ndim - 1)
    ax = a.gather(-1, t).reshape(shape) * x
    by = b.gather(-1, t).reshape(shape) * y
    return (ax + by if sign == 1.0 else ax - by).to(x.dtype)


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[..., Any]]]:
    """Make ``torch.compile`` the identity (record what it was given) and send every size to the fused path."""
    compiled: list[Callable[..., Any]] = []

    def fake_compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        assert kwargs["dynamic"] is True and callable(kwargs["backend"])
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(noising, "_fused_kernels", {})
    monkeypatch.setattr(noising, "_FUSED_MIN_NUMEL", 1)
    monkeypatch.setattr(noising, "_compile_enabled", True)
    yield compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fused_formula_is_the_seed_formula_bitwise(
    eager_compile: list[Callable[..., Any]], dtype: torch.dtype, sign: float
) -> None:
    a, b = _tables()
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 3, 5, 7), (3, 2, 4, 6, 6), (5, 129)]:
        x = (3.0 * torch.randn(shape, generator=gen)).to(dtype)
        y = torch.randn(shape, generator=gen).to(dtype)
        t = torch.randint(0, T, (shape[0],), generator=gen)
        t[0], t[-1] = 0, T - 1
        out = noising.combine(t, a, x, b, y, sign)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, _seed(t, a, x, b, y, sign))
    assert len(eager_compile) == 1  # one kernel per sign, built once


def test_fused_path_matches_eager_path_on_views(eager_compile: list[Callable[..., Any]]) -> None:
    a, b = _tables()
    base = torch.randn(6, 4, 8, 8).to(torch.bfloat16)
    x, y = base[1:5], base[2:6].clone()  # a view of another tensor's storage
    t = torch.tensor([0, 10, 500, 999])
    fused = noising.q_sample(x, t, y, a, b)
    assert eager_compile
    noising.set_compile_enabled(False)
    assert torch.equal(fused, noising.q_sample(x, t, y, a, b))
    assert torch.equal(fused, _seed(t, a, x, b, y, 1.0))


@pytest.mark.parametrize(
    "case",
    ["requires_grad", "one_sample", "non_contiguous", "mixed_dtypes", "float64", "disabled"],
)
def test_fused_path_skipped(eager_compile: list[Callable[..., Any]], case: str) -> None:
    a, b = _tables()
    x, y, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    if case == "requires_grad":
        x.requires_grad_()
    elif case == "one_sample":
        x, y, t = x[:1], y[:1], t[:1]
    elif case == "non_contiguous":
        x = x.transpose(2, 3)
        y = y.transpose(2, 3)
    elif case == "mixed_dtypes":
        x = x.to(torch.bfloat16)
    elif case == "float64":
        x, y = x.double(), y.double()
    else:
        noising.set_compile_enabled(False)
    out = noising.combine(t, a, x, b, y)
    assert eager_compile == []  # the eager path, not the kernel
    assert torch.equal(out, _seed(t, a, x, b, y, 1.0))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_direct_call_of_the_traced_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo traces the kernel (inductor replaced by the traced graph itself): the graph is then called directly."""
    import torch._inductor.compile_fx

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", lambda gm, example_inputs: gm)
    monkeypatch.setattr(noising, "_fused_kernels", {})
    monkeypatch.setattr(noising, "_FUSED_MIN_NUMEL", 1)
    monkeypatch.setattr(noising, "_compile_enabled", True)
    a, b = _tables()
    gen = torch.Generator().manual_seed(2)
    for shape in [(4, 3, 8, 8), (2, 5, 7)]:
        x, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        t = torch.randint(0, T, (shape[0],), generator=gen)
        assert torch.equal(noising.q_sample(x, t, y, a, b), _seed(t, a, x, b, y, 1.0))
    kernel = noising._fused_kernels[True]
    direct = kernel.direct[torch.float32]
    assert direct is not None  # the graph's inputs were mapped onto (x, a, y, b): no dynamo on later calls
    assert set(direct[1]) == {(0, 0), (0, 1), (0, None), (1, None), (2, None), (3, None)}  # B, N, x, a, y, b


def test_compile_failure_falls_back_once_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def broken_compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        calls.append(fn)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(noising, "_fused_kernels", {})
    monkeypatch.setattr(noising, "_FUSED_MIN_NUMEL", 1)
    monkeypatch.setattr(noising, "_compile_enabled", True)
    a, b = _tables()
    x, y, t = torch.randn(3, 4, 4), torch.randn(3, 4, 4), torch.tensor([0, 7, 999])
    with caplog.at_level(logging.WARNING, logger="lightning_ldm.noising"):
        first = noising.q_sample(x, t, y, a, b)
        second = noising.q_sample(x, t, y, a, b)
    assert torch.equal(first, _seed(t, a, x, b, y, 1.0)) and torch.equal(second, first)
    assert len(calls) == 1 and not noising.compile_enabled()
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler" in warnings[0].getMessage()


def test_set_compile_enabled_rejects_non_bool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noising, "_compile_enabled", True)
    with pytest.raises(TypeError, match=r"enabled must be a bool, got 'yes'"):
        noising.set_compile_enabled("yes")  # type: ignore[arg-type]
    noising.set_compile_enabled(False)
    assert noising.compile_enabled() is False


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(os.environ.get("LIGHTNING_LDM_TEST_COMPILE") != "1", reason="set LIGHTNING_LDM_TEST_COMPILE=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_bitwise(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(noising, "_compile_enabled", True)
    a, b = _tables()
    gen = torch.Generator().manual_seed(1)
    x = (3.0 * torch.randn(16, 4, 64, 64, generator=gen)).to(dtype)
    y = torch.randn(16, 4, 64, 64, generator=gen).to(dtype)
    t = torch.randint(0, T, (16,), generator=gen)
    assert noising._use_fused(x, y, a, b, 1.0)
    for sign in (1.0, -1.0):
        out = noising.combine(t, a, x, b, y, sign)
        assert noising.compile_enabled(), "the compiled kernel failed and fell back"
        assert noising._fused_kernels[sign == 1.0].direct[dtype] is not None, "called through dynamo"
        assert torch.equal(out, _seed(t, a, x, b, y, sign))
