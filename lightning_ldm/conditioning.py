r"""Route conditions into the denoising network as CompVis does, and drop them for classifier-free guidance.

CompVis' ``LatentDiffusion.apply_model`` turns the condition into a dict of lists, and ``DiffusionWrapper.forward``
routes it by the model's ``conditioning_key``:

===============  ==============================================================================================
key              call
===============  ==============================================================================================
``None``         ``model(x, t)``
``"concat"``     ``model(torch.cat([x, *c_concat], 1), t)``
``"crossattn"``  ``model(x, t, context=torch.cat(c_crossattn, 1))``
``"hybrid"``     ``model(torch.cat([x, *c_concat], 1), t, context=torch.cat(c_crossattn, 1))``
``"adm"``        ``model(x, t, y=c_crossattn[0])``
===============  ==============================================================================================

A diffusers network (``UNet2DModel``, ``UNet2DConditionModel`` or one with their call convention, see
:mod:`~lightning_ldm.call_convention`) gets the same conditions under diffusers' names, and its output's ``.sample``
is returned:

===============  ==============================================================================================
key              call
===============  ==============================================================================================
``None``         ``model(x, t).sample``
``"concat"``     ``model(torch.cat([x, *c_concat], 1), t).sample``
``"crossattn"``  ``model(x, t, encoder_hidden_states=torch.cat(c_crossattn, 1)).sample``
``"hybrid"``     ``model(torch.cat([x, *c_concat], 1), t, encoder_hidden_states=torch.cat(c_crossattn, 1)).sample``
``"adm"``        ``model(x, t, class_labels=c_crossattn[0]).sample`` (refused for a UNet without a class embedding)
===============  ==============================================================================================

A condition that is not a dict (a Tensor, or a list of Tensors) goes under ``"c_concat"`` for ``"concat"`` and under
``"c_crossattn"`` otherwise. :class:`HybridConditioner` returns the dict form directly.

Where the reference silently ignores or misroutes input (a condition passed to an unconditional model, a ``c_concat``
given to a cross-attention model, several ``adm`` vectors of which it keeps the first), these functions raise.

:func:`drop_conditions` replaces, per key of the dict and per sample, the condition by a null condition with a given
probability, drawing one ``torch.rand`` per sample and key from the generator it is given (the mixin's per-rank,
per-batch generator), so the drop is resume-exact and does not depend on the sample dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import Tensor, nn

from lightning_ldm._checks import check_choice, check_real
from lightning_ldm.call_convention import call_denoiser, resolve_call_convention
from lightning_ldm.instantiation import instantiate_from_config

__all__ = [
    "CONDITIONING_KEYS",
    "COND_DICT_KEYS",
    "CondDict",
    "ConditioningKey",
    "HybridConditioner",
    "apply_conditioned",
    "as_cond_dict",
    "drop_conditions",
]

ConditioningKey = Literal["concat", "crossattn", "hybrid", "adm"]
CONDITIONING_KEYS: tuple[str, ...] = get_args(ConditioningKey)
#: The keys of a condition in dict form, in the order :func:`drop_conditions` draws them.
COND_DICT_KEYS: tuple[str, ...] = ("c_concat", "c_crossattn")
CondDict: TypeAlias = dict[str, list[Tensor]]

_USES: dict[str | None, tuple[str, ...]] = {
    None: (),
    "concat": ("c_concat",),
    "crossattn": ("c_crossattn",),
    "hybrid": ("c_concat", "c_crossattn"),
    "adm": ("c_crossattn",),
}
NullCondition: TypeAlias = Tensor | Sequence[Tensor | None] | None


def _check_key(conditioning_key: str | None) -> None:
    if conditioning_key is not None:
        check_choice("conditioning_key", conditioning_key, CONDITIONING_KEYS)


def _as_tensor_list(name: str, value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) for v in value):
        if not value:
            raise ValueError(f"{name} is an empty list; expected at least one Tensor")
        return list(value)
    raise TypeError(f"{name} must be a Tensor or a list of Tensors, got {type(value).__name__}")


def as_cond_dict(cond: Any, conditioning_key: str | None) -> CondDict:
    """The condition in CompVis' dict form ``{"c_concat": [...], "c_crossattn": [...]}`` (``apply_model``'s rule).

    Args:
        cond: A dict with keys among ``"c_concat"``/``"c_crossattn"`` (values: a Tensor or a list of Tensors), a
            Tensor, a list of Tensors, or ``None``.
        conditioning_key: One of :data:`CONDITIONING_KEYS` or ``None``; a non-dict ``cond`` goes under
            ``"c_concat"`` for ``"concat"``, under ``"c_crossattn"`` otherwise.

    Returns:
        A new dict of new lists (the tensors are not copied); ``{}`` for ``cond=None``.

    Raises:
        ValueError: Unknown ``conditioning_key``, an unknown dict key, or an empty list.
        TypeError: ``cond`` or one of its values has the wrong type.
    """
    _check_key(conditioning_key)
    if cond is None:
        return {}
    if isinstance(cond, Mapping):
        unknown = [k for k in cond if k not in COND_DICT_KEYS]
        if unknown:
            raise ValueError(f"cond has the keys {unknown!r}; expected keys among {list(COND_DICT_KEYS)!r}")
        return {k: _as_tensor_list(f"cond[{k!r}]", v) for k, v in cond.items()}
    if isinstance(cond, (Tensor, list, tuple)):
        key = "c_concat" if conditioning_key == "concat" else "c_crossattn"
        return {key: _as_tensor_list("cond", cond)}
    raise TypeError(
        f"cond must be a Tensor, a list of Tensors, a dict with 'c_concat'/'c_crossattn' or None, "
        f"got {type(cond).__name__}"
    )


def _cat(name: str, tensors: list[Tensor], x: Tensor, spatial: bool) -> Tensor:
    """``torch.cat(tensors, 1)`` after checking the dimensions other than 1 (against ``x`` for concat)."""
    ref = x if spatial else tensors[0]
    for i, c in enumerate(tensors):
        if c.ndim < 2 or c.ndim != ref.ndim or c.shape[0] != x.shape[0] or c.shape[2:] != ref.shape[2:]:
            against = f"x {tuple(x.shape)}" if spatial else f"{name}[0] {tuple(ref.shape)} and x's batch {x.shape[0]}"
            raise ValueError(
                f"{name}[{i}] has shape {tuple(c.shape)}, which does not concatenate along dim 1 with {against}"
            )
    return torch.cat(tensors, dim=1)


def apply_conditioned(
    model: Callable[..., Any],
    x: Tensor,
    t: Tensor,
    cond: Any,
    conditioning_key: str | None,
    *,
    call_convention: str = "auto",
) -> Any:
    """Call ``model`` with the condition routed as CompVis' ``DiffusionWrapper`` does (see the module docstring).

    Args:
        model: The denoising network.
        x: Noisy latents ``(B, C, ...)``.
        t: Timesteps, passed through unchanged.
        cond: The condition, in any form :func:`as_cond_dict` takes; ``None`` for ``conditioning_key=None``.
        conditioning_key: ``"concat"``, ``"crossattn"``, ``"hybrid"``, ``"adm"`` or ``None`` (unconditional).
        call_convention: ``"compvis"`` (``context=``/``y=``), ``"diffusers"`` (``encoder_hidden_states=``/
            ``class_labels=``, output ``.sample``) or ``"auto"``: read from ``model``'s signature
            (:func:`~lightning_ldm.call_convention.resolve_call_convention`).

    Returns:
        The model's output (under the diffusers convention, the prediction unwrapped from it).

    Raises:
        ValueError: Unknown ``conditioning_key`` or ``call_convention``; a condition the key does not use (including
            any condition for ``None``) or a missing one; shapes that do not concatenate; more than one ``adm``
            vector; an ``adm`` vector for a diffusers UNet that has no class embedding.
        TypeError: ``cond`` has the wrong type, or ``model`` does not take the keyword its convention routes the
            condition to (the message names both conventions).
    """
    parts = as_cond_dict(cond, conditioning_key)
    convention = resolve_call_convention(model, call_convention)
    uses = _USES[conditioning_key]
    extra = [k for k in parts if k not in uses]
    missing = [k for k in uses if k not in parts]
    if extra or missing:
        raise ValueError(
            f"conditioning_key={conditioning_key!r} uses {list(uses)!r}; cond has {list(parts)!r}"
            + (f" (unused: {extra!r})" if extra else "")
            + (f" (missing: {missing!r})" if missing else "")
        )
    routed_by = f"conditioning_key={conditioning_key!r}"
    if conditioning_key == "adm":
        (y, *rest) = parts["c_crossattn"]
        if rest:
            raise ValueError(f"conditioning_key='adm' takes one class/vector condition, got {len(rest) + 1}")
        return call_denoiser(model, x, t, convention, vector=y, routed_by=routed_by)
    if "c_concat" in parts:
        x = torch.cat([x, _cat("c_concat", parts["c_concat"], x, spatial=True)], dim=1)
    context = _cat("c_crossattn", parts["c_crossattn"], x, spatial=False) if "c_crossattn" in parts else None
    return call_denoiser(model, x, t, convention, context=context, routed_by=routed_by)


def _null_list(key: str, null: NullCondition, length: int) -> list[Tensor | None]:
    if null is None or isinstance(null, Tensor):
        if isinstance(null, Tensor) and length != 1:
            raise ValueError(
                f"null[{key!r}] is one Tensor but cond[{key!r}] holds {length}; pass a list of {length} null "
                "conditions (None for zeros)"
            )
        return [null] * length
    if isinstance(null, (list, tuple)) and all(n is None or isinstance(n, Tensor) for n in null):
        if len(null) != length:
            raise ValueError(f"null[{key!r}] holds {len(null)} conditions but cond[{key!r}] holds {length}")
        return list(null)
    raise TypeError(f"null[{key!r}] must be a Tensor, a list of Tensors/None, or None; got {type(null).__name__}")


def _replace(key: str, i: int, c: Tensor, null: Tensor | None, mask: Tensor) -> Tensor:
    """``where(mask, null, c)`` per sample, ``null`` broadcast from ``c.shape[1:]`` or batch 1."""
    if null is None:
        null = torch.zeros((), dtype=c.dtype, device=c.device)
    elif null.shape == c.shape[1:]:
        null = null.unsqueeze(0)
    elif null.ndim != c.ndim or null.shape[0] not in (1, c.shape[0]) or null.shape[1:] != c.shape[1:]:
        raise ValueError(
            f"null[{key!r}] has shape {tuple(null.shape)}, which does not fit cond[{key!r}][{i}] of shape "
            f"{tuple(c.shape)}; expected {tuple(c.shape[1:])}, {(1, *c.shape[1:])} or {tuple(c.shape)}"
        )
    keep = mask.to(c.device).view(-1, *([1] * (c.ndim - 1)))
    return torch.where(keep, null.to(device=c.device, dtype=c.dtype), c)


def drop_conditions(
    cond: Mapping[str, list[Tensor]],
    probs: Mapping[str, float],
    null: Mapping[str, NullCondition] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[CondDict, dict[str, Tensor]]:
    """Replace conditions by null conditions per sample, for classifier-free guidance training.

    For each key of ``probs``, in the order of :data:`COND_DICT_KEYS`, one mask is drawn for the batch:
    ``torch.rand(B, generator=generator, device=generator.device, dtype=torch.float32) < probs[key]`` (with no
    generator: the global RNG on the condition's device). Samples where it is ``True`` get the null condition in
    every tensor of ``cond[key]``. The draw is made for every key of ``probs`` even at ``p = 0`` or ``1``, so the
    generator advances by the same amount whatever the probabilities. A null that requires grad (a learned null
    embedding) receives gradients.

    Args:
        cond: A condition in dict form (see :func:`as_cond_dict`); not modified.
        probs: Drop probability per key (``"c_concat"``/``"c_crossattn"``), each in ``[0, 1]``.
        null: Null condition per key: a Tensor of the per-sample shape, of batch 1 or of the full shape, ``None``
            for zeros, or a list of those when ``cond[key]`` holds several tensors. Keys absent here use zeros.
        generator: The generator to draw from.

    Returns:
        ``(new_cond, masks)``: a new dict (the tensors of keys not in ``probs`` are the same objects) and, per key of
        ``probs``, the ``(B,)`` bool mask of dropped samples on the generator's device.

    Raises:
        ValueError: A key of ``probs``/``null`` is not a key of ``cond``; a probability outside ``[0, 1]``; the
            tensors of one key disagree on the batch size; a null condition of the wrong shape or count.
        TypeError: A probability is not a real number, or a null condition has the wrong type.
    """
    null = {} if null is None else null
    for name, given in (("probs", probs), ("null", null)):
        unknown = [k for k in given if k not in cond or k not in COND_DICT_KEYS]
        if unknown:
            raise ValueError(f"{name} has the keys {unknown!r}, which are not keys of cond {list(cond)!r}")
    unprobed = [k for k in null if k not in probs]
    if unprobed:
        raise ValueError(f"null has the keys {unprobed!r}, which have no drop probability in probs")
    p = {k: check_real(f"probs[{k!r}]", probs[k], minimum=0.0, maximum=1.0) for k in probs}
    new = {k: list(v) for k, v in cond.items()}
    masks: dict[str, Tensor] = {}
    for key in (k for k in COND_DICT_KEYS if k in p):
        tensors = new[key]
        batch = tensors[0].shape[0] if tensors[0].ndim else 0
        if any(c.ndim == 0 or c.shape[0] != batch for c in tensors):
            shapes = [tuple(c.shape) for c in tensors]
            raise ValueError(f"the tensors of cond[{key!r}] must share one batch size, got shapes {shapes}")
        nulls = _null_list(key, null.get(key), len(tensors))
        device = generator.device if generator is not None else tensors[0].device
        masks[key] = torch.rand(batch, generator=generator, device=device, dtype=torch.float32) < p[key]
        new[key] = [_replace(key, i, c, n, masks[key]) for i, (c, n) in enumerate(zip(tensors, nulls, strict=True))]
    return new, masks


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
        allowed_prefixes: Restrict the modules the configs may import (see :func:`get_obj_from_str`). When the
            conditioner is itself built by a restricted :func:`instantiate_from_config`, that restriction applies
            too; this argument can only narrow it.

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
