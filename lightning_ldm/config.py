"""Build objects from ``{"target": "package.module.Name", "params": {...}}`` configs, and the HybridConditioner.

A config names code to import and call, so a config from elsewhere can run anything importable (``os.system``,
``subprocess.Popen``). Pass ``allowed_prefixes`` to restrict the modules a config may reach: the target is checked
before anything is imported, and the object found must also be defined under an allowed prefix (so an allowed module
cannot re-export ``os.system``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["ConfigImportError", "HybridConditioner", "get_obj_from_str", "instantiate_from_config"]

_SENTINELS = ("__is_first_stage__", "__is_unconditional__")


class ConfigImportError(ImportError, ValueError):
    """A config's ``target`` could not be imported (an ``ImportError`` and a ``ValueError``)."""


def _check_prefixes(allowed_prefixes: Sequence[str] | None) -> tuple[str, ...] | None:
    if allowed_prefixes is None:
        return None
    if isinstance(allowed_prefixes, str) or not all(isinstance(p, str) for p in allowed_prefixes):
        raise TypeError(
            f"allowed_prefixes must be a sequence of module prefixes such as ['lightning_ldm.', 'torch.nn.'], "
            f"got {allowed_prefixes!r}"
        )
    return tuple(p.rstrip(".") for p in allowed_prefixes)


def _allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    """``path`` is one of ``prefixes`` or lies inside one (whole dotted components: ``torch.nn`` ≠ ``torch.nnx``)."""
    return any(path == p or path.startswith(p + ".") for p in prefixes if p)


def get_obj_from_str(string: str, *, allowed_prefixes: Sequence[str] | None = None) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    Args:
        string: Dotted path: the module, then the attribute.
        allowed_prefixes: When given, only targets under one of these module prefixes (``"lightning_ldm."``,
            ``"torch.nn."``; matched on whole dotted components) are imported, and the object found must be defined
            under one of them too. ``None`` allows everything (the seed's behaviour).

    Returns:
        The attribute.

    Raises:
        TypeError: ``string`` is not a str, or ``allowed_prefixes`` is not a sequence of str.
        ValueError: ``string`` has no dot, or lies (or resolves) outside ``allowed_prefixes``.
        ConfigImportError: The module does not import or has no such attribute (an ``ImportError`` and a
            ``ValueError``).
    """
    prefixes = _check_prefixes(allowed_prefixes)
    if not isinstance(string, str):
        raise TypeError(f"target must be a str 'package.module.Name', got {string!r} of type {type(string).__name__}")
    module_name, dot, name = string.rpartition(".")
    if not dot or not module_name or not name:
        raise ValueError(f"target={string!r} is not a dotted path; expected 'package.module.Name'")
    if prefixes is not None and not _allowed(string, prefixes):
        raise ValueError(
            f"target={string!r} is not allowed: it lies outside allowed_prefixes={list(allowed_prefixes or ())!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigImportError(f"target={string!r}: could not import module {module_name!r}: {err}") from err
    try:
        obj = getattr(module, name)
    except AttributeError as err:
        raise ConfigImportError(f"target={string!r}: module {module_name!r} has no attribute {name!r}") from err
    if prefixes is not None:
        origin = obj.__name__ if isinstance(obj, type(module)) else getattr(obj, "__module__", None)
        if not isinstance(origin, str) or not _allowed(origin, prefixes):
            raise ValueError(
                f"target={string!r} resolves to an object defined in {origin!r}, outside "
                f"allowed_prefixes={list(allowed_prefixes or ())!r}"
            )
    return obj


def instantiate_from_config(config: Any, *, allowed_prefixes: Sequence[str] | None = None) -> Any:
    """Call ``config["target"]`` with ``**config["params"]``.

    Args:
        config: A mapping with a ``"target"`` (``"package.module.Name"``) and optional ``"params"`` (a mapping of
            keyword arguments; ``None`` counts as empty). The strings ``"__is_first_stage__"`` and
            ``"__is_unconditional__"`` give ``None``, as in the seed.
        allowed_prefixes: Restrict the importable modules (see :func:`get_obj_from_str`).

    Returns:
        The object built, or ``None`` for the two sentinel strings.

    Raises:
        KeyError: No ``"target"`` (``"Expected key `target` to instantiate."``), also for any other string.
        TypeError: ``config`` is not a mapping, ``params`` is not a mapping or has non-str keys.
        ValueError: See :func:`get_obj_from_str`.
        ConfigImportError: See :func:`get_obj_from_str`.

    Example:
        >>> instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
        Linear(in_features=2, out_features=3, bias=True)
    """
    if isinstance(config, str):
        if config in _SENTINELS:
            return None
        raise KeyError(
            f"Expected key `target` to instantiate. Got the string {config!r}; the only string configs are "
            f"{', '.join(map(repr, _SENTINELS))}"
        )
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a mapping with a 'target' key (or one of {', '.join(map(repr, _SENTINELS))}), got "
            f"{type(config).__name__}"
        )
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params of target={config['target']!r} must be a mapping, got {type(params).__name__}")
    bad = [k for k in params if not isinstance(k, str)]
    if bad:
        raise TypeError(f"params of target={config['target']!r} must have str keys, got {bad!r}")
    return get_obj_from_str(config["target"], allowed_prefixes=allowed_prefixes)(**params)


def _build(name: str, spec: Any, allowed_prefixes: Sequence[str] | None) -> Callable[..., Any]:
    built = spec if isinstance(spec, nn.Module) else instantiate_from_config(spec, allowed_prefixes=allowed_prefixes)
    if not callable(built):
        raise TypeError(f"{name} must be an nn.Module or a config that builds a callable one, got {built!r}")
    return built


class HybridConditioner(nn.Module):
    """Condition through concatenation and cross-attention at once.

    Args:
        c_concat_config: Config of the concat conditioner (see :func:`instantiate_from_config`) or a ready module.
        c_crossattn_config: Config of the cross-attention conditioner, or a ready module.
        allowed_prefixes: Restrict the modules the configs may import (see :func:`get_obj_from_str`).

    Raises:
        TypeError: A config builds something that is not callable (e.g. a sentinel string giving ``None``).
        KeyError, ValueError, ConfigImportError: See :func:`instantiate_from_config`.
    """

    def __init__(
        self,
        c_concat_config: Mapping[str, Any] | nn.Module,
        c_crossattn_config: Mapping[str, Any] | nn.Module,
        *,
        allowed_prefixes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.concat_conditioner = _build("c_concat_config", c_concat_config, allowed_prefixes)
        self.crossattn_conditioner = _build("c_crossattn_config", c_crossattn_config, allowed_prefixes)

    def forward(self, c_concat: Tensor, c_crossattn: Tensor) -> dict[str, list[Tensor]]:
        """Return ``{"c_concat": [f(c_concat)], "c_crossattn": [g(c_crossattn)]}``."""
        return {
            "c_concat": [self.concat_conditioner(c_concat)],
            "c_crossattn": [self.crossattn_conditioner(c_crossattn)],
        }
