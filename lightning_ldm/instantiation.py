"""Build objects from ``{"target": "package.module.Name", "params": {...}}`` configs (CompVis' loader, restricted).

A config names code to import and call, so a config from elsewhere can run anything importable (``os.system``,
``subprocess.Popen``). Pass ``allowed_prefixes`` to restrict the modules a config may reach. The restriction holds for
everything built from that config:

* the target string must lie under an allowed prefix (whole dotted components) and is checked before anything is
  imported; no component may be private (``_name``, ``__getattr__``);
* the object found must be defined under an allowed prefix too (judged by its ``__module__``, or a module's
  ``__name__``), so an allowed module cannot re-export ``os.system`` or hand out the modules it imported;
* the package's own loaders (:func:`instantiate_from_config`, :func:`get_obj_from_str`) are not targets;
* while a target runs, the restriction is active in a context variable: any config built inside it (the nested configs
  of a :class:`~lightning_ldm.conditioning.HybridConditioner`, or any class whose ``__init__`` calls
  :func:`instantiate_from_config`) must satisfy it as well as its own ``allowed_prefixes``, which can narrow but
  never widen it;
* what a target returns may not be a callable (or module) defined outside the allowed prefixes.
"""

from __future__ import annotations

import contextvars
import importlib
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lightning_ldm._checks import check_mapping, check_str

__all__ = ["ConfigImportError", "get_obj_from_str", "instantiate_from_config"]

_SENTINELS = ("__is_first_stage__", "__is_unconditional__")

Restriction = tuple[str, ...]

#: The allow-lists of every restricted ``instantiate_from_config`` call that is running in this context; a target must
#: satisfy each of them.
_ACTIVE: contextvars.ContextVar[tuple[Restriction, ...]] = contextvars.ContextVar("lightning_ldm_allowed_prefixes")


class ConfigImportError(ImportError, ValueError):
    """A config's ``target`` could not be imported (an ``ImportError`` and a ``ValueError``)."""


def _check_prefixes(allowed_prefixes: Sequence[str] | None) -> Restriction | None:
    if allowed_prefixes is None:
        return None
    if isinstance(allowed_prefixes, str) or not all(isinstance(p, str) for p in allowed_prefixes):
        raise TypeError(
            f"allowed_prefixes must be a sequence of module prefixes such as ['lightning_ldm.', 'torch.nn.'], "
            f"got {allowed_prefixes!r}"
        )
    return tuple(p.rstrip(".") for p in allowed_prefixes)


def _restrictions(allowed_prefixes: Sequence[str] | None) -> tuple[Restriction, ...]:
    """The active allow-lists (inherited from enclosing calls) plus ``allowed_prefixes`` when given."""
    own = _check_prefixes(allowed_prefixes)
    active = _ACTIVE.get(())
    return active if own is None or own in active else (*active, own)


def _allowed(path: str, prefixes: Restriction) -> bool:
    """``path`` is one of ``prefixes`` or lies inside one (whole dotted components: ``torch.nn`` ≠ ``torch.nnx``)."""
    return any(path == p or path.startswith(p + ".") for p in prefixes if p)


def _shown(prefixes: Restriction) -> list[str]:
    return [p + "." for p in prefixes]


def _origin(obj: Any) -> str | None:
    """Where ``obj`` is defined: a module's ``__name__``, else its (or its class's) ``__module__``."""
    origin = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return origin if isinstance(origin, str) else None


def _check_origin(what: str, obj: Any, restrictions: tuple[Restriction, ...]) -> None:
    origin = _origin(obj)
    for prefixes in restrictions:
        if origin is None or not _allowed(origin, prefixes):
            raise ValueError(
                f"{what} an object defined in {origin!r}, outside allowed_prefixes={_shown(prefixes)!r} "
                f"(a {type(obj).__name__})"
            )


def _loaders() -> tuple[Any, ...]:
    return (instantiate_from_config, get_obj_from_str)


def _resolve(string: str, restrictions: tuple[Restriction, ...]) -> Any:
    check_str("target", string, what="a str 'package.module.Name'")
    module_name, dot, name = string.rpartition(".")
    if not dot or not module_name or not name:
        raise ValueError(f"target={string!r} is not a dotted path; expected 'package.module.Name'")
    for prefixes in restrictions:
        if not _allowed(string, prefixes):
            raise ValueError(f"target={string!r} is not allowed: it lies outside allowed_prefixes={_shown(prefixes)!r}")
    if restrictions and any(part.startswith("_") for part in string.split(".")):
        raise ValueError(
            f"target={string!r} is not allowed: private names (a component starting with '_') are not targets "
            "when allowed_prefixes is set"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigImportError(f"target={string!r}: could not import module {module_name!r}: {err}") from err
    try:
        obj = getattr(module, name)
    except AttributeError as err:
        raise ConfigImportError(f"target={string!r}: module {module_name!r} has no attribute {name!r}") from err
    if restrictions:
        if any(obj is loader for loader in _loaders()):
            raise ValueError(
                f"target={string!r} is not allowed: the config loaders (instantiate_from_config, get_obj_from_str) "
                "are not targets when allowed_prefixes is set"
            )
        _check_origin(f"target={string!r} resolves to", obj, restrictions)
    return obj


def get_obj_from_str(string: str, *, allowed_prefixes: Sequence[str] | None = None) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    Args:
        string: Dotted path: the module, then the attribute.
        allowed_prefixes: When given, only targets under one of these module prefixes (``"lightning_ldm."``,
            ``"torch.nn."``; matched on whole dotted components) are imported, and the object found must be defined
            under one of them too (see the module docstring for the full rule). A restriction active from an
            enclosing :func:`instantiate_from_config` applies as well. ``None`` and no active restriction allows
            everything (CompVis' behaviour).

    Returns:
        The attribute.

    Raises:
        TypeError: ``string`` is not a str, or ``allowed_prefixes`` is not a sequence of str.
        ValueError: ``string`` has no dot, or lies (or resolves) outside ``allowed_prefixes``, names a private
            component, or is one of the loaders.
        ConfigImportError: The module does not import or has no such attribute (an ``ImportError`` and a
            ``ValueError``).
    """
    return _resolve(string, _restrictions(allowed_prefixes))


@contextmanager
def _active(restrictions: tuple[Restriction, ...]) -> Iterator[None]:
    token = _ACTIVE.set(restrictions)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def instantiate_from_config(config: Any, *, allowed_prefixes: Sequence[str] | None = None) -> Any:
    """Call ``config["target"]`` with ``**config["params"]``.

    Args:
        config: A mapping with a ``"target"`` (``"package.module.Name"``) and optional ``"params"`` (a mapping of
            keyword arguments; ``None`` counts as empty). The strings ``"__is_first_stage__"`` and
            ``"__is_unconditional__"`` give ``None``, as in CompVis.
        allowed_prefixes: Restrict the importable modules (see :func:`get_obj_from_str`). The restriction stays
            active while the target runs, so every config built inside it must satisfy it too, and the result may
            not be a callable or module defined outside the allowed prefixes.

    Returns:
        The object built, or ``None`` for the two sentinel strings.

    Raises:
        KeyError: No ``"target"`` (``"Expected key `target` to instantiate."``), also for any other string.
        TypeError: ``config`` is not a mapping, ``params`` is not a mapping or has non-str keys.
        ValueError: See :func:`get_obj_from_str`; also a restricted target that returns a callable or module
            defined outside the allowed prefixes.
        ConfigImportError: See :func:`get_obj_from_str`.

    Example:
        >>> instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
        Linear(in_features=2, out_features=3, bias=True)
    """
    restrictions = _restrictions(allowed_prefixes)
    if isinstance(config, str):
        if config in _SENTINELS:
            return None
        raise KeyError(
            f"Expected key `target` to instantiate. Got the string {config!r}; the only string configs are "
            f"{', '.join(map(repr, _SENTINELS))}"
        )
    check_mapping("config", config, f"a mapping with a 'target' key (or one of {', '.join(map(repr, _SENTINELS))})")
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params")
    if params is None:
        params = {}
    check_mapping(f"params of target={config['target']!r}", params)
    bad = [k for k in params if not isinstance(k, str)]
    if bad:
        raise TypeError(f"params of target={config['target']!r} must have str keys, got {bad!r}")
    target = _resolve(config["target"], restrictions)
    if not restrictions:
        return target(**params)
    with _active(restrictions):
        built = target(**params)
    if callable(built) or isinstance(built, types.ModuleType):
        _check_origin(f"target={config['target']!r} returned", built, restrictions)
    return built
