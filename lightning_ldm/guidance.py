r"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a conditional model.

:func:`guided_model` turns ``model(x, t, **kwargs)`` plus a conditional and an unconditional input into the
``model_fn(x, t)`` that the samplers call: with guidance scale ``s ≠ 1`` the two branches run as one batch of 2B and
the output is ``out_u + s·(out_c − out_u)`` in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ldm._checks import check_real

__all__ = ["Conditioning", "eval_mode", "guided_condition", "guided_model"]

#: A conditioning input: a tensor (passed as the keyword ``cond=``), a mapping of keyword arguments, or ``None``.
Conditioning = Tensor | Mapping[str, Any] | None


def _as_kwargs(value: Conditioning, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return {"cond": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        f"{name} must be a Tensor (passed as model(..., cond=...)), a mapping of keyword arguments or None, "
        f"got {type(value).__name__}"
    )


def _expand_batch(value: Tensor, batch_size: int, name: str) -> Tensor:
    if value.ndim == 0 or value.shape[0] not in (1, batch_size):
        raise ValueError(
            f"{name} must have batch size {batch_size} (or 1, broadcast over the batch), got shape {tuple(value.shape)}"
        )
    return value.expand(batch_size, *value.shape[1:]) if value.shape[0] != batch_size else value


def _broadcast(value: Any, batch_size: int, where: str) -> Any:
    """``value`` with every tensor in it (through lists and dicts) expanded from batch 1 to ``batch_size``."""
    if isinstance(value, Tensor):
        return _expand_batch(value, batch_size, where)
    if isinstance(value, (list, tuple)):
        items = [_broadcast(v, batch_size, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        return {k: _broadcast(v, batch_size, f"{where}[{k!r}]") for k, v in value.items()}
    return value


def _cat_pair(u: Any, c: Any, batch_size: int, u_name: str, c_name: str) -> Any:
    """``torch.cat([u, c])`` leaf by leaf through matching lists and dicts (CompVis' ``c_crossattn`` lists).

    ``u_name``/``c_name``: how messages name ``u`` and ``c`` (e.g. ``"uncond['context']"``).
    """
    if isinstance(c, Tensor) and isinstance(u, Tensor):
        return torch.cat([_expand_batch(u, batch_size, u_name), _expand_batch(c, batch_size, c_name)])
    if isinstance(c, (list, tuple)) and isinstance(u, (list, tuple)) and len(c) == len(u):
        return [
            _cat_pair(ui, ci, batch_size, f"{u_name}[{i}]", f"{c_name}[{i}]")
            for i, (ui, ci) in enumerate(zip(u, c, strict=True))
        ]
    if isinstance(c, Mapping) and isinstance(u, Mapping):
        if set(c) != set(u):
            raise ValueError(f"{c_name} and {u_name} must name the same keys, got {sorted(c)} and {sorted(u)}")
        return {k: _cat_pair(u[k], c[k], batch_size, f"{u_name}[{k!r}]", f"{c_name}[{k!r}]") for k in c}
    raise TypeError(
        f"{c_name} and {u_name} must be tensors (or lists/dicts of tensors of the same structure) to batch "
        f"them, got {type(c).__name__} and {type(u).__name__}"
    )


def guided_model(
    model: Callable[..., Tensor],
    batch_size: int,
    *,
    guidance_scale: float = 1.0,
    cond: Conditioning = None,
    uncond: Conditioning = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model`` into ``model_fn(x, t)`` with classifier-free guidance.

    A tensor ``cond`` is passed as the keyword ``cond=``, a mapping is merged into the keyword arguments (e.g.
    ``{"context": emb}``). With ``guidance_scale`` s ≠ 1 the unconditional and conditional branches run as one batch
    of 2B (``uncond`` first; tensors in ``model_kwargs`` with batch B are repeated) and the output is
    ``out_u + s·(out_c − out_u)`` in float32. With s = 1 only the conditional branch runs. At every scale the
    tensors in ``cond``/``uncond`` (through lists and dicts) must have batch B or 1; batch 1 is broadcast over the
    B samples (one prompt for every sample), so s = 1 and s ≠ 1 accept the same conditions.

    Args:
        model: The network, called as ``model(x, t, **model_kwargs, **cond_kwargs)``.
        batch_size: B, the number of samples.
        guidance_scale: The guidance scale s.
        cond: Conditioning (tensor or keyword mapping).
        uncond: Unconditional conditioning, needed when s ≠ 1.
        model_kwargs: Keyword arguments for every call.

    Returns:
        ``model_fn(x, t) -> Tensor``.

    Raises:
        ValueError: Guidance without ``uncond``/``cond``, keywords that differ between the two, or a conditioning
            tensor of the wrong batch size.
        TypeError: ``cond``/``uncond`` is neither a tensor, a mapping nor ``None``, or a guided entry is not a tensor
            (or a list/dict of tensors matched by the other side).
    """
    scale = check_real("guidance_scale", guidance_scale)
    whole = (isinstance(cond, Tensor), isinstance(uncond, Tensor))  # a tensor is named cond, not cond['cond']
    cond_kw, uncond_kw = _as_kwargs(cond, "cond"), _as_kwargs(uncond, "uncond")
    return _guide(model, batch_size, scale, cond_kw, uncond_kw, dict(model_kwargs or {}), whole)


def guided_condition(
    model: Callable[..., Tensor], batch_size: int, guidance_scale: float, cond: Any, uncond: Any
) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`guided_model` for a condition of any structure passed whole, as ``model(x, t, cond=...)``.

    What :meth:`~lightning_ldm.mixin.DiffusionMixin.sample` uses: its condition (a tensor, CompVis' ``c_concat`` /
    ``c_crossattn`` dict, a list, ...) goes to ``apply_model`` as one argument, and error messages name it ``cond``
    and ``uncond`` as the caller wrote them. Arguments, returns and errors: those of :func:`guided_model`.
    """
    return _guide(
        model,
        batch_size,
        check_real("guidance_scale", guidance_scale),
        None if cond is None else {"cond": cond},
        None if uncond is None else {"cond": uncond},
        {},
        whole=(True, True),
    )


def _guide(
    model: Callable[..., Tensor],
    batch_size: int,
    scale: float,
    cond_kw: dict[str, Any] | None,
    uncond_kw: dict[str, Any] | None,
    base_kw: dict[str, Any],
    whole: tuple[bool, bool],
) -> Callable[[Tensor, Tensor], Tensor]:
    """The guidance of :func:`guided_model` on keyword dicts (``None``: not given).

    ``whole``: for ``cond`` and ``uncond``, whether it was one argument (named ``cond``/``uncond`` in messages) rather
    than a mapping of keywords (named ``cond['key']``).
    """

    def name(side: str, key: str) -> str:
        return side if whole[side == "uncond"] else f"{side}[{key!r}]"

    if scale == 1.0:
        conditions = {k: _broadcast(v, batch_size, name("cond", k)) for k, v in (cond_kw or {}).items()}
        single_kw = {**base_kw, **conditions}
        return lambda x, t: model(x, t, **single_kw)
    if uncond_kw is None or cond_kw is None:
        raise ValueError(
            f"guidance_scale={scale:g} needs both cond and uncond (the unconditional input, e.g. a null embedding); "
            "pass guidance_scale=1.0 for unguided sampling"
        )
    if set(cond_kw) != set(uncond_kw):
        raise ValueError(f"cond and uncond must name the same keywords, got {sorted(cond_kw)} and {sorted(uncond_kw)}")
    pair_kw = dict(base_kw)
    for key, value in base_kw.items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
            pair_kw[key] = torch.cat([value, value])
    for key in cond_kw:
        pair_kw[key] = _cat_pair(uncond_kw[key], cond_kw[key], batch_size, name("uncond", key), name("cond", key))

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), **pair_kw)
        out_u, out_c = out.float().chunk(2)
        return out_u + scale * (out_c - out_u)

    return model_fn


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put ``model`` (if it is an ``nn.Module``) in eval mode and restore every submodule's mode afterwards."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.training = mode
