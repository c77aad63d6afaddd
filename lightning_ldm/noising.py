r"""Forward noising and the parameterization identities, as functions of per-timestep tables.

Every identity here has the form :math:`a_t x + s \, b_t y` with :math:`a, b` tables indexed by the timestep:

=========================  ===================================  =====================================
function                   formula                              tables (a, b)
=========================  ===================================  =====================================
:func:`q_sample`           √ā·x0 + √(1−ā)·ε                      sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_noise`  √(1/ā)·x_t − √(1/ā−1)·ε       sqrt_recip, sqrt_recipm1
:func:`get_v`              √ā·ε − √(1−ā)·x0                     sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_start_from_v`      √ā·x_t − √(1−ā)·v             sqrt_alphas_cumprod, sqrt_one_minus
:func:`predict_noise_from_v`      √ā·v + √(1−ā)·x_t             sqrt_alphas_cumprod, sqrt_one_minus
=========================  ===================================  =====================================

so one function, :func:`combine`, does the arithmetic for all of them. Coefficients are gathered from the
(float32 or float64) tables and used in float32; only the result is cast to the sample's dtype. Casting the tables
to bf16 first, as some peers do, leaves **no noise at all** at t = 0 and 1.

Speed: in eager PyTorch the mixed-precision arithmetic takes several passes over memory (on CPU a bf16 sample is
first copied to float32, and the float32 intermediate is written, read back and cast). On CPU, :func:`combine`
therefore runs large contiguous float32/bf16/fp16 inputs through one fused kernel built by ``torch.compile``: one
read of each input and one write of the result, the same float32 operations, bitwise equal to the eager path.
Everything else (small tensors, autograd, other devices, float64, inside a ``torch.compile`` region) takes the eager
path. Compilation happens once per dtype on first use (seconds; cached on disk by inductor). Turn it off with the
environment variable ``LIGHTNING_LDM_COMPILE=0`` or :func:`set_compile_enabled`; if compilation is unavailable or
fails, a warning is logged once and the eager path is used from then on.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from lightning_ldm.nn import check_timestep_indices, gather_coefficients

log = logging.getLogger(__name__)

__all__ = [
    "combine",
    "compile_enabled",
    "get_v",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "q_sample",
    "set_compile_enabled",
]


def _check(t: Tensor, x: Tensor, y: Tensor, coef_x: Tensor, coef_y: Tensor, names: tuple[str, str]) -> None:
    if coef_x.ndim != 1 or coef_y.ndim != 1 or coef_x.shape != coef_y.shape:
        raise ValueError(
            f"the two coefficient tables must be 1-D and of one length, got shapes {tuple(coef_x.shape)} and "
            f"{tuple(coef_y.shape)}"
        )
    check_timestep_indices(t, coef_x.shape[0])
    if x.ndim < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(f"t has {t.shape[0]} timesteps but {names[0]} has batch shape {tuple(x.shape[:1])}")
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


# Smallest sample (elements) sent to the fused kernel. Below it the kernel's fixed cost (~10 µs on CPU) outweighs the
# memory passes it saves (eager takes three for float32, about six for bf16/fp16).
_FUSED_MIN_NUMEL = 1 << 16
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_compile_enabled: bool = os.environ.get("LIGHTNING_LDM_COMPILE", "1").strip().lower() not in {"0", "false", "off", "no"}
_fused_kernels: dict[bool, _FusedKernel] = {}


def set_compile_enabled(enabled: bool) -> None:
    """Turn the fused CPU kernel of :func:`combine` on or off for this process.

    The initial value comes from the environment variable ``LIGHTNING_LDM_COMPILE`` (``0``, ``false``, ``off`` or
    ``no`` turn it off; on otherwise). Results are the same bits either way; only the speed differs.

    Args:
        enabled: Use the ``torch.compile``-built kernel where it applies.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    global _compile_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _compile_enabled = enabled


def compile_enabled() -> bool:
    """Whether :func:`combine` may use its fused CPU kernel (see :func:`set_compile_enabled`)."""
    return _compile_enabled


# The eager path's arithmetic in one kernel, on (B, N) samples: x·a and y·b each rounded to float32, their sum
# (difference) rounded, one cast to the sample's dtype. a, b: the gathered float32 coefficients, shape (B,).
def _axpby(x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> Tensor:
    return (x.float() * a.unsqueeze(1) + y.float() * b.unsqueeze(1)).to(x.dtype)


def _axmby(x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> Tensor:
    return (x.float() * a.unsqueeze(1) - y.float() * b.unsqueeze(1)).to(x.dtype)


_ARG_POSITIONS = {"x": 0, "a": 1, "y": 2, "b": 3}
_PLACEHOLDER = re.compile(r"L\['(\w+)'\](?:\.size\(\)\[(\d+)\])?")


_Binding = list[tuple[int, int | None]]
# How the compiled graph's inputs map onto (x, a, y, b) when dynamo orders them as usual: B, N, x, a, y, b.
_USUAL_BINDING: _Binding = [(0, 0), (0, 1), (0, None), (1, None), (2, None), (3, None)]
_Direct = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class _FusedKernel:
    """``_axpby``/``_axmby`` compiled by inductor, one graph per dtype, called without dynamo's per-call cost.

    ``torch.compile`` (dynamic shapes) builds the kernel; a small backend around inductor's ``compile_fx`` keeps the
    compiled graph and how its inputs map onto ``(x, a, y, b)`` (sizes first, then tensors), and, where inductor
    exposes it, the generated module's own entry point below AOTAutograd's runtime wrappers (which have nothing to do
    here: one inference graph, no autograd, no aliasing, a fresh output). Dynamo's guards and frame handling cost
    ~35 µs per call and the wrappers ~5 µs, more than the kernel on a 1 MiB sample; :func:`_use_fused` already
    guarantees what those guards would check (CPU, contiguous ``(B, N)`` samples of one dtype with ``B, N >= 2``,
    float32 ``(B,)`` coefficients), so the compiled code is called directly. Each entry point is checked bitwise
    against the eager formula on a second shape before it is trusted; one that cannot be mapped or checked is
    replaced by the next outer one (inductor's module, AOTAutograd's wrapper, dynamo).
    """

    def __init__(self, add: bool) -> None:
        self.fn = _axpby if add else _axmby
        self.compiled = torch.compile(self.fn, backend=self._backend, dynamic=True)
        # per dtype: ``(x, a, y, b) -> result`` calling the compiled code directly and the input binding it uses, or
        # None (call through dynamo)
        self.direct: dict[torch.dtype, tuple[_Direct, _Binding] | None] = {}
        self._captured: tuple[Callable[..., Any], _Binding] | None = None
        self._inner: list[Any] = []

    def _inner_compile(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx_inner

        out = compile_fx_inner(*args, **kwargs)
        self._inner.append(out)
        return out

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._functorch import config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        self._inner = []
        # no AOTAutograd cache: on a hit it skips inner compilation, and with it the module entry point kept below
        # (inductor's own FX graph cache still saves the C++ build)
        if "inner_compile" in inspect.signature(compile_fx).parameters:
            with functorch_config.patch(enable_autograd_cache=False):
                compiled = cast(Callable[..., Any], compile_fx(gm, example_inputs, inner_compile=self._inner_compile))
        else:  # an inductor without the hook: AOTAutograd's wrapper is the innermost entry point
            compiled = cast(Callable[..., Any], compile_fx(gm, example_inputs))
        self._captured = None
        try:
            binding: _Binding = []
            for node in gm.graph.find_nodes(op="placeholder"):
                source = node.meta["grapharg"].source
                name = source.name() if callable(source.name) else source.name
                match = _PLACEHOLDER.fullmatch(name)
                if match is None or match.group(1) not in _ARG_POSITIONS:
                    return compiled
                binding.append(
                    (_ARG_POSITIONS[match.group(1)], None if match.group(2) is None else int(match.group(2)))
                )
            self._captured = (compiled, binding)
        except Exception:  # an inductor/dynamo version that records graph inputs differently: keep dynamo's path
            self._captured = None
        return compiled

    @staticmethod
    def _caller(fn: Callable[..., Any], binding: _Binding, boxed: bool) -> _Direct:
        """``(x, a, y, b) -> fn(inputs)[0]`` with the inputs laid out by ``binding``, as a list when ``boxed``."""
        if binding == _USUAL_BINDING:
            if boxed:
                return lambda x, a, y, b: fn([x.shape[0], x.shape[1], x, a, y, b])[0]
            return lambda x, a, y, b: fn(x.shape[0], x.shape[1], x, a, y, b)[0]

        def call(x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> Tensor:
            args = (x, a, y, b)
            inputs = [args[i] if dim is None else args[i].shape[dim] for i, dim in binding]
            return fn(inputs)[0] if boxed else fn(*inputs)[0]

        return call

    def _prepare(self, dtype: torch.dtype) -> None:
        """Compile for ``dtype`` on a synthetic sample (the caller's RNG untouched) and check the direct call."""
        gen = torch.Generator().manual_seed(0)

        def sample(batch: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return (
                torch.randn(batch, n, generator=gen).to(dtype),
                torch.rand(batch, generator=gen),
                torch.randn(batch, n, generator=gen).to(dtype),
                torch.rand(batch, generator=gen),
            )

        self._captured = None
        with torch.no_grad():
            self.compiled(*sample(8, 1 << 16))  # realistic size hints for inductor's loop and threading choices
            captured, self._captured = self._captured, None
            inner, self._inner = self._inner, []
            self.direct[dtype] = None
            if captured is None:
                return
            candidates = []
            module_call = getattr(inner[0], "current_callable", None) if len(inner) == 1 else None
            if callable(module_call):
                candidates.append(self._caller(module_call, captured[1], boxed=True))
            candidates.append(self._caller(captured[0], captured[1], boxed=False))
            check = sample(3, 1001)
            expected = self.fn(*check)
            for candidate in candidates:
                try:
                    out = candidate(*check)
                except Exception:  # an entry point that takes its inputs differently: try the next one
                    continue
                if isinstance(out, Tensor) and out.dtype == expected.dtype and torch.equal(out, expected):
                    self.direct[dtype] = (candidate, captured[1])
                    return

    def __call__(self, x: Tensor, a: Tensor, y: Tensor, b: Tensor) -> Tensor:
        """``a·x ± b·y`` for ``(B, N)`` samples ``x``, ``y`` (one dtype) and float32 ``(B,)`` coefficients."""
        try:
            direct = self.direct[x.dtype]
        except KeyError:
            self._prepare(x.dtype)
            direct = self.direct[x.dtype]
        if direct is not None:  # no autograd here, and the graph has no autograd: grad mode does not matter
            return direct[0](x, a, y, b)
        # through dynamo: detached aliases, so that its guards do not depend on the caller's views; under no_grad,
        # so that one grad mode (one graph per dtype) serves every call
        with torch.no_grad():
            return self.compiled(x.detach(), a, y.detach(), b)


def _use_fused(x: Tensor, y: Tensor, coef_x: Tensor, coef_y: Tensor, sign: float) -> bool:
    # cheapest tests first: this runs on every call of combine
    if not _compile_enabled or sign not in (1.0, -1.0):
        return False
    dtype = x.dtype
    if dtype not in _FUSED_DTYPES or y.dtype != dtype:
        return False
    shape = x.shape
    if len(shape) < 2 or shape != y.shape:
        return False
    numel = x.numel()
    if numel < _FUSED_MIN_NUMEL or shape[0] < 2 or numel < 2 * shape[0]:
        return False  # a size-1 batch or sample: the compiled graph assumes both sizes >= 2
    if not (x.is_cpu and y.is_cpu and coef_x.is_cpu and coef_y.is_cpu and x.is_contiguous() and y.is_contiguous()):
        return False
    if (x.requires_grad or y.requires_grad or coef_x.requires_grad or coef_y.requires_grad) and torch.is_grad_enabled():
        return False
    return not torch.compiler.is_compiling()


def _fused(x: Tensor, a: Tensor, y: Tensor, b: Tensor, sign: float) -> Tensor | None:
    """Run the compiled kernel on ``(B, N)`` views; ``None`` (after one warning) if it cannot be compiled or run."""
    global _compile_enabled
    add = sign == 1.0
    shape = x.shape
    batch = shape[0]
    n = x.numel() // batch
    try:
        kernel = _fused_kernels.get(add)
        if kernel is None:
            kernel = _fused_kernels[add] = _FusedKernel(add)
        return kernel(x.view(batch, n), a, y.view(batch, n), b).view(shape)
    except Exception as err:  # no C++ compiler, an inductor failure...: fall back for good
        _compile_enabled = False
        log.warning(
            "lightning_ldm: the fused torch.compile kernel of combine/q_sample is unavailable (%s: %s); using the "
            "eager path from now on (set LIGHTNING_LDM_COMPILE=0 to skip the attempt)",
            type(err).__name__,
            err,
        )
        return None


def combine(t: Tensor, coef_x: Tensor, x: Tensor, coef_y: Tensor, y: Tensor, sign: float = 1.0) -> Tensor:
    """Return ``coef_x[t]·x + sign·coef_y[t]·y`` with float32 coefficients, in ``x``'s dtype.

    The arithmetic is float32 (float64 for float64 samples) and rounds exactly as the reference's
    ``extract_into_tensor(a, t, x.shape) * x + extract_into_tensor(b, t, x.shape) * y`` does: each product rounded,
    their sum rounded; the result is then cast to ``x``'s dtype once. Large contiguous CPU inputs go through one fused
    kernel (see the module docstring) that gives the same bits.

    No validation: callers check ``t`` (the public functions below do).

    Args:
        t: 1-D integer timesteps, one per sample.
        coef_x: Table of ``a``, indexed by timestep.
        x: First tensor, batch first.
        coef_y: Table of ``b``.
        y: Second tensor, the shape of ``x``.
        sign: ``1.0`` or ``-1.0``: add or subtract the second term.

    Returns:
        ``a[t]·x + sign·b[t]·y`` in ``x``'s dtype.
    """
    if _use_fused(x, y, coef_x, coef_y, sign):
        a = coef_x.index_select(0, t)  # gather_coefficients(coef_x, t, 1), inlined on this per-call path
        b = coef_y.index_select(0, t)
        if a.dtype != torch.float32:
            a = a.float()
        if b.dtype != torch.float32:
            b = b.float()
        fused = _fused(x, a, y, b, sign)
        if fused is not None:
            return fused
    a = gather_coefficients(coef_x, t, x.ndim)
    b = gather_coefficients(coef_y, t, x.ndim)
    out = x * a  # float32 or wider: a is float32
    if sign == 1.0:
        out += y * b  # two rounded products, one rounded sum: the reference's `a[t] * x + b[t] * y`, bit for bit
    elif sign == -1.0:
        out -= y * b
    else:
        out += y * (b * sign)
    return out.to(x.dtype)


def q_sample(
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Diffuse ``x_start`` to timestep ``t``: ``√ā_t·x_start + √(1−ā_t)·noise``.

    Args:
        x_start: Clean samples, batch first, any floating dtype.
        t: 1-D integer timesteps, one per sample.
        noise: Standard normal noise of ``x_start``'s shape.
        sqrt_alphas_cumprod: Table ``√ā`` (float32 or float64).
        sqrt_one_minus_alphas_cumprod: Table ``√(1−ā)``.
        validate: Check ``t`` and the shapes (one host sync on an accelerator). Hot loops that drew ``t`` themselves
            pass ``False``.

    Returns:
        Noisy samples in ``x_start``'s dtype.

    Raises:
        TypeError: ``t`` is not an integer tensor.
        ValueError: ``t`` is out of range or the shapes disagree.
    """
    if validate:
        _check(t, x_start, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_start", "noise"))
    return combine(t, sqrt_alphas_cumprod, x_start, sqrt_one_minus_alphas_cumprod, noise)


def predict_start_from_noise(
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``x0 = √(1/ā_t)·x_t − √(1/ā_t − 1)·ε`` (see :func:`q_sample` for the arguments)."""
    if validate:
        _check(t, x_t, noise, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, ("x_t", "noise"))
    return combine(t, sqrt_recip_alphas_cumprod, x_t, sqrt_recipm1_alphas_cumprod, noise, sign=-1.0)


def get_v(
    x_start: Tensor,
    noise: Tensor,
    t: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """The v-prediction target ``v = √ā_t·ε − √(1−ā_t)·x0`` (Salimans & Ho 2022)."""
    if validate:
        _check(t, x_start, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_start", "noise"))
    return combine(t, sqrt_alphas_cumprod, noise, sqrt_one_minus_alphas_cumprod, x_start, sign=-1.0)


def predict_start_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``x0 = √ā_t·x_t − √(1−ā_t)·v``."""
    if validate:
        _check(t, x_t, v, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_t", "v"))
    return combine(t, sqrt_alphas_cumprod, x_t, sqrt_one_minus_alphas_cumprod, v, sign=-1.0)


def predict_noise_from_v(
    x_t: Tensor,
    t: Tensor,
    v: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    *,
    validate: bool = True,
) -> Tensor:
    """Recover ``ε = √ā_t·v + √(1−ā_t)·x_t``."""
    if validate:
        _check(t, x_t, v, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, ("x_t", "v"))
    return combine(t, sqrt_alphas_cumprod, v, sqrt_one_minus_alphas_cumprod, x_t)
