"""Gradient checkpointing that recomputes exactly what the forward pass computed.

``checkpoint(func, inputs, params, flag)`` keeps CompVis' signature and its reentrant engine
(:class:`CheckpointFunction`), and fixes what CompVis gets wrong:

* **Autocast.** Lightning runs ``backward`` outside the autocast region, so a checkpoint that does not carry the
  autocast state recomputes in float32 under ``precision="bf16-mixed"``/``"16-mixed"`` and the gradients silently
  differ. The forward pass records the autocast state of every autocast-capable device type (``torch.amp`` API) and
  the recomputation runs under the same state.
* **RNG.** The CPU RNG state and, where CUDA is initialised, the CUDA RNG state of the devices involved are restored
  for the recomputation, so dropout draws the same mask (as ``torch.utils.checkpoint`` does).
* **Inputs.** Tensor inputs are saved with ``save_for_backward`` (in-place modification before backward is detected,
  saved-tensor hooks see them). Non-tensor inputs (``None``, numbers, strings, ...) are passed through to ``func``
  unchanged and get no gradient; a list/tuple/dict input that holds a tensor requiring grad is refused at forward time
  (its gradient would be lost silently). Keyword arguments (``kwargs=``) travel positionally through the engine, so a
  tensor passed by keyword (a denoiser's ``context=``) gets its gradient like a positional one; binding it into a
  ``functools.partial`` would make it a constant of the recomputation and drop its gradient silently.
* **Parameters.** When ``func`` is an ``nn.Module``, a bound method of one, or a ``functools.partial`` of either,
  that module's parameters requiring grad that are missing from ``params`` are added (CompVis silently leaves them
  without gradient). Parameters used by any other callable (a closure, a lambda) cannot be seen: pass them in
  ``params`` or use ``use_reentrant=False``.
* **Backward twice.** The graph can be backpropagated again with ``retain_graph=True`` (each backward recomputes);
  without it, a second backward raises torch's ``RuntimeError`` ("Trying to backward through the graph a second
  time") instead of CompVis' ``AttributeError``.

``use_reentrant=False`` hands the call to ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which tracks
every parameter itself and works with DDP ``find_unused_parameters=True`` (the reentrant engine does not).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.amp.autocast_mode import is_autocast_available

from lightning_ldm._checks import describe

__all__ = ["CheckpointFunction", "checkpoint"]


def _autocast_device_types() -> tuple[str, ...]:
    privateuse1 = torch.device("privateuseone").type  # the name a PrivateUse1 backend registered, if any
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", privateuse1]
    found: list[str] = []
    for name in dict.fromkeys(names):
        try:
            if is_autocast_available(name):
                found.append(name)
        except RuntimeError:  # pragma: no cover - a backend name torch does not know
            continue
    return tuple(found)


#: Device types whose autocast state is carried from forward to recomputation.
AUTOCAST_DEVICE_TYPES: tuple[str, ...] = _autocast_device_types()

_AutocastState = tuple[tuple[tuple[str, torch.dtype], ...], bool]


def _autocast_state() -> _AutocastState:
    """The ``(device_type, dtype)`` pairs with autocast enabled now, and the autocast cache flag."""
    enabled = tuple(
        (device_type, torch.get_autocast_dtype(device_type))
        for device_type in AUTOCAST_DEVICE_TYPES
        if torch.is_autocast_enabled(device_type)
    )
    return enabled, torch.is_autocast_cache_enabled()


def _enter_autocast(stack: contextlib.ExitStack, state: _AutocastState) -> None:
    """Reproduce ``state``: enable the recorded device types, disable any enabled now that was not enabled then."""
    enabled, cache_enabled = state
    recorded = dict(enabled)
    for device_type in AUTOCAST_DEVICE_TYPES:
        if device_type in recorded:
            stack.enter_context(
                torch.autocast(device_type, dtype=recorded[device_type], enabled=True, cache_enabled=cache_enabled)
            )
        elif torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))


def _cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    if not torch.cuda.is_initialized():
        return []
    devices = {t.device.index for t in tensors if t.device.type == "cuda"}
    devices.add(torch.cuda.current_device())
    return sorted(i for i in devices if i is not None)


def _module_of(func: Callable[..., Any]) -> nn.Module | None:
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, nn.Module):
        return func
    owner = getattr(func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _holds_grad_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_holds_grad_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_grad_tensor(v) for v in value.values())
    return False


class _KeywordCall:
    """``func(*values[:length], **dict(zip(names, values[length:])))``.

    The reentrant engine sees only positional inputs, so keyword arguments travel after them, each differentiated
    (tensors) or passed through (the rest).
    """

    def __init__(self, func: Callable[..., Any], length: int, names: tuple[str, ...]) -> None:
        self.func = func
        self.length = length
        self.names = names

    def __call__(self, *values: Any) -> Any:
        keywords = dict(zip(self.names, values[self.length :], strict=True))
        return self.func(*values[: self.length], **keywords)


def _forward(ctx: Any, run_function: Callable[..., Any], length: int, args: tuple[Any, ...], rng: bool) -> Any:
    inputs = args[:length]
    ctx.run_function = run_function
    ctx.length = length
    ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
    ctx.non_tensor_inputs = [None if isinstance(x, Tensor) else x for x in inputs]
    ctx.input_params = args[length:]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))
    ctx.autocast_state = _autocast_state()
    ctx.preserve_rng_state = rng
    if rng:
        ctx.cpu_rng_state = torch.get_rng_state()
        ctx.cuda_devices = _cuda_devices(x for x in inputs if isinstance(x, Tensor))
        ctx.cuda_rng_states = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
    with torch.no_grad():
        outputs = run_function(*inputs)
    if not isinstance(outputs, (Tensor, tuple)):
        raise TypeError(
            "checkpointed function must return a Tensor or a tuple (gradients cannot flow through a "
            f"{type(outputs).__name__}); return a tuple, or use use_reentrant=False"
        )
    return outputs


def _recompute(ctx: Any, inputs: list[Any]) -> Any:
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        # aliases made under grad mode, so in-place ops in run_function leave the detached inputs leaves
        aliases = [x.view_as(x) if isinstance(x, Tensor) else x for x in inputs]
        _enter_autocast(stack, ctx.autocast_state)
        return ctx.run_function(*aliases)


def _backward(ctx: Any, output_grads: tuple[Any, ...]) -> tuple[Tensor | None, ...]:
    saved = ctx.saved_tensors  # raises torch's RuntimeError on a second backward without retain_graph
    inputs = list(ctx.non_tensor_inputs)
    needs = ctx.needs_input_grad[2:]
    targets: list[Tensor] = []
    for position, tensor in zip(ctx.tensor_positions, saved, strict=True):
        x = tensor.detach().requires_grad_(tensor.requires_grad)
        inputs[position] = x
        if needs[position]:
            targets.append(x)
    targets += [p for p, need in zip(ctx.input_params, needs[ctx.length :], strict=True) if need]

    if ctx.preserve_rng_state:
        cpu_now = torch.get_rng_state()
        cuda_now = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        torch.set_rng_state(ctx.cpu_rng_state)
        for device, state in zip(ctx.cuda_devices, ctx.cuda_rng_states, strict=True):
            torch.cuda.set_rng_state(state, device)
        try:
            outputs = _recompute(ctx, inputs)
        finally:
            torch.set_rng_state(cpu_now)
            for device, state in zip(ctx.cuda_devices, cuda_now, strict=True):
                torch.cuda.set_rng_state(state, device)
    else:
        outputs = _recompute(ctx, inputs)

    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    pairs = [
        (out, grad)
        for out, grad in zip(outputs, output_grads, strict=False)
        if isinstance(out, Tensor) and out.requires_grad and grad is not None
    ]
    grads: Sequence[Tensor | None] = [None] * len(targets)
    if pairs and targets:
        grads = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
    it = iter(grads)
    return (None, None, *(next(it) if need else None for need in needs))


class CheckpointFunction(torch.autograd.Function):
    """Reentrant checkpoint: run ``run_function`` without keeping activations, recompute it in backward.

    Called as ``CheckpointFunction.apply(run_function, length, *inputs, *params)``: the first ``length`` arguments
    after ``length`` are the inputs of ``run_function``, the rest the parameters to differentiate. The forward pass
    records the autocast state of every device type and the RNG state; the backward pass recomputes under both.
    Prefer :func:`checkpoint`, which validates the arguments.
    """

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], length: int, *args: Any) -> Any:
        """Run ``run_function(*args[:length])`` under ``no_grad``, recording what backward needs to redo it."""
        return _forward(ctx, run_function, length, args, rng=True)

    @staticmethod
    def backward(ctx: Any, *output_grads: Any) -> tuple[Tensor | None, ...]:
        """Recompute the function with the recorded autocast and RNG state, then differentiate it."""
        return _backward(ctx, output_grads)


class _CheckpointFunctionNoRng(torch.autograd.Function):
    """:class:`CheckpointFunction` without the RNG bookkeeping (``preserve_rng_state=False``)."""

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], length: int, *args: Any) -> Any:
        return _forward(ctx, run_function, length, args, rng=False)

    @staticmethod
    def backward(ctx: Any, *output_grads: Any) -> tuple[Tensor | None, ...]:
        return _backward(ctx, output_grads)


def checkpoint(
    func: Callable[..., Any],
    inputs: Sequence[Any],
    params: Iterable[Tensor],
    flag: bool,
    *,
    use_reentrant: bool = True,
    preserve_rng_state: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Evaluate ``func(*inputs, **kwargs)`` without keeping its activations; recompute them in backward.

    Args:
        func: The function to evaluate. With the reentrant engine it must return a Tensor or a tuple.
        inputs: Positional arguments of ``func``. Tensors are differentiated when they require grad; other values
            are passed through unchanged.
        params: Parameters ``func`` uses that are not among ``inputs`` (reentrant engine only; ignored otherwise).
            When ``func`` is an ``nn.Module`` or a bound method of one, its parameters requiring grad are added.
            Duplicates (and tensors already among ``inputs``) are kept once, so none gets its gradient twice.
        flag: ``False`` evaluates ``func(*inputs)`` directly, without checkpointing.
        use_reentrant: ``True`` (CompVis' engine, :class:`CheckpointFunction`); ``False`` delegates to
            ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` (needed for DDP ``find_unused_parameters``).
        preserve_rng_state: Restore the RNG state for the recomputation so dropout draws the same mask.
        kwargs: Keyword arguments of ``func``, treated as ``inputs`` are: tensors among them are differentiated
            (with the reentrant engine they travel positionally through it), other values are passed through.

    Returns:
        Whatever ``func`` returns.

    Raises:
        TypeError: ``inputs`` or ``params`` is a single tensor instead of a sequence, ``kwargs`` is not a mapping
            with string keys, a parameter is not a tensor, a list/tuple/dict input or keyword argument holds a tensor
            that requires grad, or (reentrant) ``func`` returns something other than a Tensor or a tuple.
    """
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence) or isinstance(inputs, str):
        raise TypeError(
            f"inputs must be a sequence (tuple or list) of func's arguments, got {type(inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    if kwargs is not None and (not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs)):
        raise TypeError(f"kwargs must be a mapping of keyword names (str) to func's arguments, got {describe(kwargs)}")
    keywords = dict(kwargs or {})
    if not flag:
        return func(*inputs, **keywords)
    if not use_reentrant:
        return torch.utils.checkpoint.checkpoint(
            func, *inputs, use_reentrant=False, preserve_rng_state=preserve_rng_state, **keywords
        )
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. module.parameters()), got a single Tensor")
    module = _module_of(func)
    names = [f"inputs[{i}]" for i in range(len(inputs))] + [f"kwargs[{k!r}]" for k in keywords]
    if keywords:  # keyword arguments travel after the positional ones
        func, inputs = _KeywordCall(func, len(inputs), tuple(keywords)), (*inputs, *keywords.values())
    # each tensor once: a tensor passed twice would get its gradient twice
    known = {id(x) for x in inputs if isinstance(x, Tensor)}
    param_list: list[Tensor] = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if id(p) not in known:
            known.add(id(p))
            param_list.append(p)
    if module is not None:
        param_list += [p for p in module.parameters() if p.requires_grad and id(p) not in known]
    for name, x in zip(names, inputs, strict=True):
        if not isinstance(x, Tensor) and _holds_grad_tensor(x):
            raise TypeError(
                f"{name} is a {type(x).__name__} holding a tensor that requires grad; the reentrant checkpoint "
                "cannot differentiate through containers: pass the tensors as separate inputs or use "
                "use_reentrant=False"
            )
    if not torch.is_grad_enabled() or not any(
        isinstance(x, Tensor) and x.requires_grad for x in (*inputs, *param_list)
    ):
        return func(*inputs)  # nothing to differentiate: no graph, nothing to save
    if not preserve_rng_state:
        return _CheckpointFunctionNoRng.apply(func, len(inputs), *inputs, *param_list)
    return CheckpointFunction.apply(func, len(inputs), *inputs, *param_list)
