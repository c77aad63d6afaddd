"""``torch.compile(fullgraph=True)`` traces the public entry points into one graph with the eager numbers.

The validation layer reads timesteps back to the host in eager mode only (``torch.compiler.is_compiling``), and the
embedding leaves its caches and its table path out while compiling, so a compiled training step is one graph.

* ``backend="aot_eager"`` runs the traced aten graph with the eager kernels: the results are bitwise the eager ones.
* The default inductor backend generates its own kernels: q_sample stays within one float32 rounding of the eager
  result (measured: bitwise equal); the embedding's ``exp`` (frequency row) and ``sin``/``cos`` are inductor's
  vectorised approximations, which differ from ATen's by an ulp, so the argument ``t·f`` can differ by one ulp of
  ``|t·f|``: the tolerance is ``2·eps·max(1, max|t|)`` absolute (measured for ``t < 1000``: 6.1e-5, one ulp of 1000,
  about half the tolerance), and the compiled embedding is as close to the float64 formula as that.

Graphs are counted with a counting backend (``torch.compile(backend=callable)``, public API);
``torch.compiler.reset()`` between tests.
"""

from __future__ import annotations

import functools
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_ldm import noising
from lightning_ldm.embedding import SinusoidalTimestepEmbedding, timestep_embedding
from lightning_ldm.noise_schedule import NoiseSchedule
from tests.test_embedding import bits, numpy_embedding
from tests.test_readme import _usage_block

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _fresh_compiler() -> Iterator[None]:
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class GraphCounter:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as traced (eager kernels)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


def aot(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@functools.cache
def readme_model_class() -> type:
    """The README's ``Denoiser`` class (the usage block up to its data and Trainer lines), from a real module.

    Dynamo resolves the globals of traced code through ``sys.modules[__name__]``, so the block runs as a module.
    """
    source = _usage_block()
    # readme_training_loss below repeats the README's loss call: check that it is still the README's
    assert 'self.diffusion_loss(batch[0], loss_weighting="min_snr")' in source
    module = types.ModuleType("lightning_ldm_readme_usage")
    sys.modules[module.__name__] = module
    # not a file name: dynamo (torch 2.4) tokenizes the file a traced frame names, and markdown is not Python
    exec(compile(source.split("data = DataLoader", 1)[0], "<README.md usage block>", "exec"), module.__dict__)
    return module.Denoiser


def readme_training_loss(model: Any, batch: list[Tensor], **kwargs: Any) -> Tensor:
    """The README's ``training_step`` body without ``self.log``: the loss call as written there."""
    return model.diffusion_loss(batch[0], loss_weighting="min_snr", **kwargs)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(beta_schedule="linear", timesteps=1000, parameterization="v")


def _sample(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------- q_sample
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("t_dtype", [torch.int64, torch.int32])
def test_q_sample_one_graph_bitwise_eager(schedule: NoiseSchedule, dtype: torch.dtype, t_dtype: torch.dtype) -> None:
    x, noise = _sample((8, 3, 5, 5), 0, dtype), _sample((8, 3, 5, 5), 1, dtype)
    t = torch.tensor([0, 1, 2, 500, 997, 998, 999, 3], dtype=t_dtype)
    a, b = schedule.table("sqrt_alphas_cumprod"), schedule.table("sqrt_one_minus_alphas_cumprod")
    counter = GraphCounter()
    compiled = torch.compile(noising.q_sample, fullgraph=True, backend=counter)
    eager = noising.q_sample(x, t, noise, a, b)
    assert torch.equal(compiled(x, t, noise, a, b), eager)
    assert counter.graphs == 1
    assert torch.equal(aot(noising.q_sample)(x, t, noise, a, b), eager)
    # the schedule object's method: its per-device table cache is read, not rebuilt, while compiling
    assert torch.equal(aot(schedule.q_sample)(x, t, noise), schedule.q_sample(x, t, noise))


def test_q_sample_checks_still_run_in_eager_and_static_checks_while_compiling(schedule: NoiseSchedule) -> None:
    x = _sample((2, 4), 0)
    with pytest.raises(ValueError, match=r"t holds timestep 1000, outside the valid range \[0, 999\]"):
        schedule.q_sample(x, torch.tensor([0, 1000]), x)
    # shape and dtype checks are static: they run while tracing too (fullgraph=True turns any exception raised in
    # the traced code into torch's "Unsupported"; without it the compiled call raises our error)
    compiled = torch.compile(schedule.q_sample, backend="aot_eager")
    with pytest.raises(ValueError, match="t has 3 timesteps but x_start has batch size 2"):
        compiled(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(TypeError, match="t must hold integer timesteps"):
        compiled(x, torch.tensor([0.0, 1.0]), x)


# ----------------------------------------------------------------------------------------------- embedding
EMBED_TIMESTEPS = {
    "int64": torch.arange(0, 1000, 7),
    "int32": torch.arange(0, 1000, 11, dtype=torch.int32),
    "float32 fractional": torch.rand(97, generator=torch.Generator().manual_seed(0)) * 1000,
    "float32 signed zero": torch.tensor([-0.0, 0.0, 1.0, 999.0]),
    "float64": torch.rand(33, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 999,
    "empty": torch.zeros(0, dtype=torch.long),
}


@pytest.mark.parametrize("name", list(EMBED_TIMESTEPS))
@pytest.mark.parametrize("dim", [1, 2, 7, 320])
def test_timestep_embedding_one_graph_bitwise_eager(name: str, dim: int) -> None:
    t = EMBED_TIMESTEPS[name]
    counter = GraphCounter()
    compiled = torch.compile(lambda s: timestep_embedding(s, dim), fullgraph=True, backend=counter)
    out = compiled(t)
    assert counter.graphs == 1
    assert out.shape == (t.shape[0], dim) and out.dtype == torch.float32
    assert torch.equal(bits(out), bits(timestep_embedding(t, dim)))


def test_embedding_module_and_readme_call_one_graph_bitwise_eager() -> None:
    t = torch.tensor([0, 1, 250, 999])
    module = SinusoidalTimestepEmbedding(33, max_period=5000)
    assert torch.equal(bits(aot(module)(t)), bits(module(t)))
    model = readme_model_class()(timesteps=1000, dim=32)
    eager = timestep_embedding(t, model.hparams.dim)  # the README forward's call
    counter = GraphCounter()
    compiled = torch.compile(lambda s: timestep_embedding(s, model.hparams.dim), fullgraph=True, backend=counter)
    assert torch.equal(bits(compiled(t)), bits(eager))
    assert counter.graphs == 1


def test_embedding_gradient_through_compiled_graph_equals_eager() -> None:
    t = torch.tensor([0.5, 7.25, 999.0])
    t_eager, t_compiled = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    timestep_embedding(t_eager, 12).sum().backward()
    out = aot(lambda s: timestep_embedding(s, 12))(t_compiled)
    out.sum().backward()
    assert torch.equal(bits(out.detach()), bits(timestep_embedding(t, 12)))
    assert t_eager.grad is not None and t_compiled.grad is not None
    assert torch.equal(t_compiled.grad, t_eager.grad)


# ------------------------------------------------------------------------------------ diffusion_loss
TORCH_BEFORE_2_5 = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5)


@pytest.mark.parametrize("loss_weighting", ["none", "min_snr", "vlb"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_diffusion_loss_given_t_and_noise_one_graph_bitwise_eager(loss_weighting: str, parameterization: str) -> None:
    model = readme_model_class()(timesteps=1000, dim=8)
    model.register_schedule(beta_schedule="linear", timesteps=1000, parameterization=parameterization)
    x, noise = _sample((4, 3, 8, 8), 0), _sample((4, 3, 8, 8), 1)
    t = torch.tensor([0, 17, 998, 999])

    def loss_fn(x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return model.diffusion_loss(x, t=t, noise=noise, loss_weighting=loss_weighting)

    eager = loss_fn(x, t, noise)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    eager_last = model.last_timestep_losses
    counter = GraphCounter()
    assert torch.equal(torch.compile(loss_fn, fullgraph=True, backend=counter)(x, t, noise), eager)
    assert counter.graphs == 1
    compiled = aot(loss_fn)(x, t, noise)
    assert torch.equal(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, list(model.parameters())), eager_grads, strict=True):
        if TORCH_BEFORE_2_5:  # torch 2.4's AOT autograd decomposes the conv backward: same maths, other rounding
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want)
    assert eager_last is not None and model.last_timestep_losses is not None  # the side effect ran once more
    assert torch.equal(model.last_timestep_losses[0], eager_last[0])
    assert torch.equal(model.last_timestep_losses[1], eager_last[1])


def test_readme_training_step_is_one_graph() -> None:
    """The README's loss call: 1 graph with t and noise drawn (global RNG) or given, and the eager numbers."""
    model = readme_model_class()()
    batch = [_sample((16, 3, 16, 16), 0)]
    counter = GraphCounter()
    compiled = torch.compile(lambda b: readme_training_loss(model, b), fullgraph=True, backend=counter)
    torch.manual_seed(123)
    eager = readme_training_loss(model, batch)
    torch.manual_seed(123)
    assert torch.equal(compiled(batch), eager)  # the same draws from the global RNG, the same loss
    assert counter.graphs == 1

    t, noise = model.draw_timesteps(16), model.draw_noise(batch[0], dtype=torch.float32)
    model.diffusion_generator = torch.Generator().manual_seed(0)  # DiffusionSeedCallback installs one; unused here
    given = GraphCounter()
    compiled_given = torch.compile(
        lambda b, t, n: readme_training_loss(model, b, t=t, noise=n), fullgraph=True, backend=given
    )
    assert torch.equal(compiled_given(batch, t, noise), readme_training_loss(model, batch, t=t, noise=noise))
    assert given.graphs == 1


# ------------------------------------------------------------------------------------------------ inductor
def test_a_cpp_compiler_is_available_for_inductor() -> None:
    assert shutil.which("g++") or shutil.which("c++"), "the inductor tests below need a C++ compiler (g++ or c++)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_inductor_within_one_rounding_of_eager(schedule: NoiseSchedule, dtype: torch.dtype) -> None:
    x, noise = _sample((64, 4, 8, 8), 2, dtype), _sample((64, 4, 8, 8), 3, dtype)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(4))
    eager = schedule.q_sample(x, t, noise)
    out = torch.compile(schedule.q_sample, fullgraph=True)(x, t, noise)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), eager.double(), rtol=eps, atol=eps * 1e-3)


@pytest.mark.parametrize("dim", [2, 7, 320, 1280])
def test_timestep_embedding_inductor_within_float32_rounding(dim: int) -> None:
    for t in (torch.arange(1000), torch.rand(500, generator=torch.Generator().manual_seed(5)) * 1000):
        eager = timestep_embedding(t, dim)
        out = torch.compile(lambda s: timestep_embedding(s, dim), fullgraph=True)(t)
        assert out.shape == eager.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        tol = 2 * EPS32 * max(1.0, float(t.abs().max()))
        assert float((out - eager).abs().max()) <= tol
        # as close to the float64 formula as the eager embedding is, up to that tolerance
        exact = torch.from_numpy(numpy_embedding(t.double().numpy(), dim))
        eager_error = float((eager.double() - exact).abs().max())
        assert float((out.double() - exact).abs().max()) <= eager_error + tol
