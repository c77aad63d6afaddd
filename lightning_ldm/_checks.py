"""The package's one validation layer: every public function checks its arguments with these helpers.

Conventions: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value; each message names the argument, shows
the bad value (a tensor is summarised by :func:`describe`, never printed whole) and says what is accepted.

Checks that read tensor values back to the host (timestep ranges) run in eager mode only: under ``torch.compile``
they are skipped (:func:`torch.compiler.is_compiling`), so validation never splits a compiled graph. Checks of
shapes, dtypes and Python arguments are static and run in both modes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "check_betas",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_floating",
    "check_instance",
    "check_int",
    "check_mapping",
    "check_real",
    "check_same_shape",
    "check_sampler",
    "check_samples",
    "check_scheduler",
    "check_scheduler_steps",
    "check_shape",
    "check_str",
    "check_tensor",
    "check_timestep_list",
    "check_timesteps",
    "check_value_range",
    "describe",
]

#: Our parameterizations and the ``prediction_type`` diffusers gives each (:mod:`lightning_ldm.interop` uses it too).
PREDICTION_TYPES: Mapping[str, str] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

#: Largest ``|ā_scheduler − ā_model|`` accepted by :func:`check_scheduler`. diffusers computes its betas and ``ā`` in
#: float32: for every schedule it can express (linear, scaled linear, cosine, with and without zero terminal SNR,
#: ``trained_betas``; T = 20 and 1000) its ``alphas_cumprod`` lies within 6e-7 of our float64 ``ā`` (the 2⁻²⁴ that its
#: Euler/DPM/UniPC schedulers put in place of a zero ``ā_T`` included). 1e-5 leaves a margin of 17 over that and still
#: refuses a 1 % change of ``beta_end``.
SCHEDULER_ATOL = 1e-5

# Up to this many CPU indices, check_timesteps reads them as a Python list instead of reducing them.
_SMALL_INDEX_NUMEL = 256


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message: a tensor's shape, dtype, device and range."""
    if isinstance(value, Tensor):
        text = f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
        if value.device.type != "cpu":
            text += f", on {value.device}"
        if value.numel() and not value.is_meta and value.dtype != torch.bool and not value.dtype.is_complex:
            lo, hi = torch.aminmax(value.detach().reshape(-1))
            text += f", min {lo.item():g}, max {hi.item():g}"
        return text
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}, dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}... ({type(value).__name__})"


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Raises:
        ValueError: ``value`` is not in ``choices``.
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}={describe(value)} is not supported; expected one of {', '.join(map(repr, options))}")


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` as ``bool`` after checking it is a ``bool`` or a numpy bool (not an int, not a string).

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {describe(value)} of type {type(value).__name__}")
    return bool(value)


def check_instance(name: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """Return ``value`` after checking it is an instance of ``types``; ``what`` says what is accepted.

    Args:
        name: The argument's name for the message.
        value: The argument.
        types: The accepted type(s), as for :func:`isinstance`.
        what: The accepted values in words, e.g. ``"an nn.Module with encode/decode"``.

    Raises:
        TypeError: ``value`` is not an instance of ``types``.
    """
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {describe(value)} of type {type(value).__name__}")
    return value


def check_str(name: str, value: Any, *, nonempty: bool = False, what: str = "a string") -> str:
    """Return ``value`` after checking it is a string (a non-empty one with ``nonempty``).

    Raises:
        TypeError: ``value`` is not a ``str``.
        ValueError: ``nonempty`` and ``value`` is ``""``.
    """
    check_instance(name, value, str, what)
    if nonempty and not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    return value


def check_callable(name: str, value: Any, what: str = "callable") -> Any:
    """Return ``value`` after checking it is callable; ``what`` says how it is called (e.g. ``"callable as f(x)"``).

    Raises:
        TypeError: ``value`` is not callable.
    """
    if not callable(value):
        raise TypeError(f"{name} must be {what}, got {describe(value)} of type {type(value).__name__}")
    return value


def check_mapping(name: str, value: Any, what: str = "a mapping") -> Mapping[Any, Any]:
    """Return ``value`` after checking it is a mapping (a ``dict``, an ``OmegaConf`` dict, ...).

    Raises:
        TypeError: ``value`` is not a :class:`~collections.abc.Mapping`.
    """
    return check_instance(name, value, Mapping, what)


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as ``int`` after checking it is an integer within ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an integer (bools are refused too).
        ValueError: ``value`` lies outside the bounds.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {describe(value)} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value} is out of range; expected {bound}")
    if maximum is not None and value > maximum:
        bound = f"an integer <= {maximum}" if minimum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value} is out of range; expected {bound}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as ``float`` after checking it is a finite real number within the bounds.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or outside the bounds.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)} of type {type(value).__name__}")
    value = float(value)
    lo = "-inf" if minimum is None else f"{minimum:g}"
    hi = "inf" if maximum is None else f"{maximum:g}"
    interval = f"{'[' if min_inclusive else '('}{lo}, {hi}{']' if max_inclusive else ')'}"
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value} must be finite; expected a number in {interval}")
    too_low = minimum is not None and (value < minimum or (not min_inclusive and value == minimum))
    too_high = maximum is not None and (value > maximum or (not max_inclusive and value == maximum))
    if too_low or too_high:
        raise ValueError(f"{name}={value:g} is out of range; expected a number in {interval}")
    return value


def check_tensor(name: str, value: Any) -> Tensor:
    """Return ``value`` after checking it is a tensor.

    Raises:
        TypeError: ``value`` is not a ``torch.Tensor``.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: Any, *, min_ndim: int = 0) -> Tensor:
    """Return ``value`` after checking it is a floating tensor with at least ``min_ndim`` dimensions.

    Raises:
        TypeError: ``value`` is not a tensor, or its dtype is not floating (integer, bool, complex).
        ValueError: It has fewer than ``min_ndim`` dimensions.
    """
    check_tensor(name, value)
    if not value.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating tensor (e.g. torch.float32 or torch.bfloat16), got {describe(value)}"
        )
    if value.ndim < min_ndim:
        what = "a batch dimension" if min_ndim == 1 else f"at least {min_ndim} dimensions"
        raise ValueError(f"{name} must have {what}, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: Any, *, min_ndim: int = 1, minimum: int | None = 1) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ints after checking it is a sample shape: a sequence of integers, batch first.

    Args:
        name: The argument's name for the messages.
        value: The shape (a tuple, list or ``torch.Size`` of integers; bools and floats are refused, not truncated).
        min_ndim: The fewest entries accepted (1: a batch axis).
        minimum: The smallest size accepted per entry (``None``: no bound).

    Returns:
        The shape as a tuple of Python ints.

    Raises:
        TypeError: ``value`` is not a sequence, or an entry is not an integer (``2.7``, ``4.0``, ``True``, a tensor).
        ValueError: Fewer than ``min_ndim`` entries, or an entry below ``minimum`` (a batch of 0).
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive integers, got {type(value).__name__}")
    shape = tuple(check_int(f"{name}[{i}]", size) for i, size in enumerate(value))
    if len(shape) < min_ndim:
        more = {1: "", 2: " and at least one more"}.get(min_ndim, f" and at least {min_ndim - 1} more")
        raise ValueError(f"{name} must have a batch axis{more}, got {shape}")
    if minimum is not None and shape and shape[0] < minimum:
        raise ValueError(f"{name} must start with a positive batch size, got {shape}")
    for i, size in enumerate(shape):
        if minimum is not None and size < minimum:
            raise ValueError(f"{name}[{i}]={size} is out of range; expected an integer >= {minimum}")
    return shape


def check_value_range(value_range: Any, name: str = "value_range") -> tuple[float, float]:
    """Return ``value_range`` as ``(low, high)`` floats after checking it is a pair of finite numbers, ``low < high``.

    Raises:
        TypeError: ``value_range`` is not a pair of real numbers.
        ValueError: The numbers are not finite or ``low >= high``.
    """
    if isinstance(value_range, (str, bytes)) or not isinstance(value_range, Sequence) or len(value_range) != 2:
        raise TypeError(f"{name} must be a pair (low, high) of real numbers, got {describe(value_range)}")
    low = check_real(f"{name}[0]", value_range[0])
    high = check_real(f"{name}[1]", value_range[1])
    if not low < high:
        raise ValueError(f"{name}=({low:g}, {high:g}) is empty; expected low < high")
    return low, high


def check_timestep_list(
    timesteps: Any, num_timesteps: int | None = None, name: str = "timesteps"
) -> tuple[int, ...]:
    """Return ``timesteps`` (a non-tensor iterable of Python or numpy integers) as a tuple of distinct ints.

    Args:
        timesteps: The timesteps (a list, tuple, range, ...; a tensor goes to :func:`check_timesteps`).
        num_timesteps: T, to check every timestep lies in ``[0, T)``; ``None`` checks only ``>= 0``.
        name: The argument's name for the messages.

    Raises:
        TypeError: ``timesteps`` is not an iterable of integers (a string or a tensor is refused).
        ValueError: It is empty, repeats a timestep, or holds one outside ``[0, T)``.
    """
    if isinstance(timesteps, (str, bytes, Tensor)) or not isinstance(timesteps, Iterable):
        raise TypeError(f"{name} must be a sequence of integers, got {type(timesteps).__name__}")
    maximum = None if num_timesteps is None else check_int("num_timesteps", num_timesteps, minimum=1) - 1
    grid = tuple(check_int(f"{name}[{i}]", t, minimum=0, maximum=maximum) for i, t in enumerate(timesteps))
    if not grid:
        raise ValueError(f"{name} must hold at least one timestep, got an empty sequence")
    repeated = sorted({t for t in grid if grid.count(t) > 1})
    if repeated:
        raise ValueError(f"{name} must be distinct, got {repeated} more than once")
    return grid


def check_samples(name: str, value: Any) -> Tensor:
    """Return ``value`` after checking it is a floating batch of at least one sample of at least one element.

    Raises:
        TypeError: ``value`` is not a floating tensor.
        ValueError: It has no batch dimension, no sample, or samples without elements (a mean over none is NaN).
    """
    check_floating(name, value, min_ndim=1)
    if value.shape[0] == 0 or math.prod(value.shape[1:]) == 0:
        raise ValueError(
            f"{name} must hold at least one sample of at least one element (a mean over none is NaN), got shape "
            f"{tuple(value.shape)}"
        )
    return value


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise unless ``a`` and ``b`` have the same shape.

    Raises:
        ValueError: The shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_timesteps(
    t: Any, size: int, name: str = "t", *, batch: int | None = None, batch_of: str = "the samples"
) -> Tensor:
    """Check that ``t`` is a 1-D integer tensor of indices into a table of ``size`` entries.

    The range check reads the values back to the host (one sync on an accelerator) in eager mode; while
    ``torch.compile`` traces it is skipped, so a compiled step stays one graph.

    Args:
        t: The timesteps.
        size: Number of entries of the table they index (T).
        name: The argument's name for the messages.
        batch: The batch size ``t`` must have (one timestep per sample), if any.
        batch_of: What has that batch size, for the message (e.g. ``"x_start"``).

    Returns:
        ``t`` itself.

    Raises:
        TypeError: ``t`` is not a tensor or not of an integer dtype (``torch.long`` or ``torch.int32``).
        ValueError: ``t`` is not 1-D, has another length than ``batch``, or holds an index outside ``[0, size)``.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer timesteps, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer timesteps (torch.long or torch.int32), got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one timestep per sample, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} timesteps but {batch_of} has batch size {batch}")
    numel = t.numel()
    if numel == 0 or torch.compiler.is_compiling():
        return t
    if numel <= _SMALL_INDEX_NUMEL and t.is_cpu:
        values = t.tolist()  # a few Python ints: cheaper than a reduction and two scalar reads
        if min(values) >= 0 and max(values) < size:
            return t
    else:
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo >= 0 and hi < size:
            return t
    bad = ((t < 0) | (t >= size)).nonzero()
    index = int(bad[0, 0])
    raise ValueError(
        f"{name} holds timestep {int(t[index])}, outside the valid range [0, {size - 1}] of a {size}-step table "
        f"(first at index {index}; {name} is {describe(t)})"
    )


def check_betas(
    betas: Any,
    name: str = "betas",
    *,
    allow_terminal_one: bool = True,
    min_length: int = 1,
    context: str | None = None,
) -> np.ndarray:
    """Return ``betas`` (numpy, torch or a sequence of numbers) as a validated, contiguous 1-D float64 array.

    Args:
        betas: The schedule.
        name: The argument's name for the messages.
        allow_terminal_one: Accept a last beta of exactly 1 (a zero-terminal-SNR schedule).
        min_length: The fewest betas accepted.
        context: What produced the betas (e.g. the schedule call), named in the messages about single entries.

    Returns:
        A new float64 array.

    Raises:
        TypeError: ``betas`` is not numeric (a string, a mapping, a bool or complex tensor, ...).
        ValueError: It is not 1-D, has fewer than ``min_length`` entries, or holds a value that is not finite or lies
            outside [0, 1) (the last one may be 1 with ``allow_terminal_one``).
    """
    if isinstance(betas, Tensor):
        if betas.dtype.is_complex or betas.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {describe(betas)}")
        array = betas.detach().to("cpu", torch.float64).numpy().copy()
    else:
        if isinstance(betas, (str, bytes, Mapping)):
            raise TypeError(
                f"{name} must be a 1-D sequence, numpy array or tensor of betas, got {type(betas).__name__}"
            )
        try:
            array = np.array(betas, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a 1-D sequence, numpy array or tensor of real numbers, got {describe(betas)}"
            ) from err
    if array.ndim != 1 or array.shape[0] < min_length:
        raise ValueError(
            f"{name} must be a 1-D array of at least {min_length} per-timestep betas, got shape {array.shape}"
        )
    entry = f"{context}: beta" if context else name
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{entry}[{bad}]={float(array[bad])} is not finite; expected betas in [0, 1)")
    upper_ok = array < 1.0
    if allow_terminal_one:
        upper_ok[-1] = array[-1] <= 1.0
    ok = (array >= 0.0) & upper_ok
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        accepted = (
            "[0, 1) (only the last beta may be 1: a zero-terminal-SNR schedule)" if allow_terminal_one else "[0, 1)"
        )
        raise ValueError(f"{entry}[{bad}]={float(array[bad])!r} lies outside {accepted}")
    return np.ascontiguousarray(array)


def _config_value(scheduler: Any, key: str) -> Any:
    """``scheduler.config[key]`` (diffusers' ``FrozenDict``, a mapping or an object), ``None`` when absent."""
    config = getattr(scheduler, "config", None)
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def check_sampler(sampler: Any) -> bool:
    """Check a ``sampler=`` argument: ``"ddim"`` or a diffusers-style scheduler object; return whether it is DDIM.

    Raises:
        ValueError: A string other than ``"ddim"``.
        TypeError: An object without callable ``set_timesteps`` and ``step``.
    """
    if isinstance(sampler, str):
        if sampler != "ddim":
            raise ValueError(
                f"sampler={sampler!r} is not supported; expected 'ddim' or a diffusers-style scheduler object (e.g. "
                "DPMSolverMultistepScheduler.from_config(module.noise_schedule.to_diffusers_config()))"
            )
        return True
    missing = [name for name in ("set_timesteps", "step") if not callable(getattr(sampler, name, None))]
    if missing:
        raise TypeError(
            f"sampler must be 'ddim' or a diffusers-style scheduler with set_timesteps() and step(), but "
            f"{type(sampler).__name__} has no {' or '.join(missing)}"
        )
    return False


def check_scheduler(scheduler: Any, schedule: Any = None, num_steps: int | None = None) -> None:
    """Raise unless ``scheduler`` is a diffusers-style scheduler that fits ``schedule`` and ``num_steps``.

    Duck-typed (no diffusers import); each check runs when the scheduler has what it reads:

    * the protocol: callable ``set_timesteps`` and ``step``;
    * with ``schedule`` (a :class:`~lightning_ldm.noise_schedule.NoiseSchedule`): ``config.num_train_timesteps``
      and the length of ``alphas_cumprod`` equal T, ``alphas_cumprod`` equals the schedule's float64 ``ā`` within
      :data:`SCHEDULER_ATOL` (the tables are compared, not the names), and ``config.prediction_type`` is the one of
      the schedule's parameterization (:data:`PREDICTION_TYPES`);
    * with ``num_steps``: :func:`check_scheduler_steps` (this calls ``scheduler.set_timesteps(num_steps)``).

    Args:
        scheduler: The scheduler.
        schedule: The model's noise schedule (``tables_float64["alphas_cumprod"]`` and ``parameterization``).
        num_steps: The number of sampling steps that will be asked of it.

    Raises:
        TypeError: A protocol method is missing (the message names it), or ``num_steps`` is not an integer.
        ValueError: The scheduler and the schedule disagree (the message shows both sides), or ``num_steps`` is more
            than the scheduler supports.
    """
    kind = type(scheduler).__name__
    missing = [name for name in ("set_timesteps", "step") if not callable(getattr(scheduler, name, None))]
    if missing:
        raise TypeError(
            f"scheduler must be a diffusers-style scheduler with set_timesteps() and step(), but "
            f"{kind} has no {' or '.join(missing)}"
        )
    if schedule is not None:
        _check_scheduler_schedule(scheduler, schedule)
    if num_steps is not None:
        check_scheduler_steps(scheduler, num_steps)


def _check_scheduler_schedule(scheduler: Any, schedule: Any) -> None:
    kind = type(scheduler).__name__
    hint = f"; build it with {kind}.from_config(module.noise_schedule.to_diffusers_config())"
    ours = np.asarray(schedule.tables_float64["alphas_cumprod"], dtype=np.float64)
    steps = ours.shape[0]
    theirs_steps = _config_value(scheduler, "num_train_timesteps")
    if theirs_steps is not None and theirs_steps != steps:
        raise ValueError(
            f"scheduler {kind} has num_train_timesteps={theirs_steps!r} but the model's schedule has {steps}{hint}"
        )
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is not None:
        theirs = torch.as_tensor(table).detach().to("cpu", torch.float64).reshape(-1).numpy()
        if theirs.shape != ours.shape:
            raise ValueError(
                f"scheduler {kind} has {theirs.shape[0]} alphas_cumprod but the model's schedule has {steps}{hint}"
            )
        diff = np.abs(theirs - ours)
        bad = ~(diff <= SCHEDULER_ATOL)  # NaN is bad too
        if bad.any():
            t = int(np.argmax(np.where(bad, np.nan_to_num(diff, nan=np.inf), -1.0)))
            raise ValueError(
                f"scheduler {kind}'s alphas_cumprod differs from the model's schedule: at t={t} the scheduler has "
                f"{theirs[t]:.6g} and the model {ours[t]:.6g} (|difference| {diff[t]:.3g} > {SCHEDULER_ATOL:g}, the "
                f"float32 tolerance){hint}"
            )
    parameterization = schedule.parameterization
    expected = PREDICTION_TYPES.get(parameterization, parameterization)
    prediction = _config_value(scheduler, "prediction_type")
    if prediction is not None and prediction != expected:
        raise ValueError(
            f"scheduler {kind} has prediction_type={prediction!r} but the model predicts {parameterization!r} "
            f"(prediction_type={expected!r}){hint}"
        )


def check_scheduler_steps(scheduler: Any, num_steps: Any, *, device: torch.device | str | None = None) -> int:
    """Set ``scheduler``'s timesteps for ``num_steps`` steps and check it supports that many; return ``num_steps``.

    A scheduler supports ``num_steps`` when its ``set_timesteps`` accepts it and the timesteps it sets do not repeat:
    DPM-Solver++ and UniPC space ``num_steps + 1`` points over ``[0, T − 1]`` and round them, so from
    ``num_steps = T`` on two steps share a timestep, their step size is 0 and their samples come out NaN. (Euler's
    timesteps are real numbers and never repeat.)

    Args:
        scheduler: A diffusers-style scheduler (it is mutated: ``set_timesteps``).
        num_steps: Number of sampling steps.
        device: Passed on to ``set_timesteps`` when given.

    Returns:
        ``num_steps`` as an int.

    Raises:
        TypeError: ``num_steps`` is not an integer.
        ValueError: ``num_steps < 1``, ``set_timesteps`` refused it, or its timesteps repeat.
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    kind = type(scheduler).__name__
    steps = _config_value(scheduler, "num_train_timesteps")
    on = f" on its {steps} training timesteps" if steps is not None else ""
    try:
        if device is None:
            scheduler.set_timesteps(num_steps)
        else:
            scheduler.set_timesteps(num_steps, device=device)
    except ValueError as err:
        raise ValueError(f"num_steps={num_steps} is more than {kind} supports{on}: {err}") from err
    timesteps = getattr(scheduler, "timesteps", None)
    values = [] if timesteps is None else torch.as_tensor(timesteps).reshape(-1).tolist()
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(
                f"num_steps={num_steps} is more than {kind} supports{on}: its timesteps repeat ({value:g} twice), "
                "so a step has size 0 and the samples come out NaN; use fewer steps"
            )
        seen.add(value)
    return num_steps
