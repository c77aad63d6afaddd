r"""How a denoising network takes its condition: CompVis' ``model(x, t, context=, y=)`` or diffusers'.

===============  ===========================================================  ========================
convention       call                                                         output
===============  ===========================================================  ========================
``"compvis"``    ``model(x, t, context=c)``, ``model(x, t, y=y)``             returned as is
``"diffusers"``  ``model(x, t, encoder_hidden_states=c)``, ``class_labels=``  ``.sample`` (or ``[0]``)
===============  ===========================================================  ========================

``"auto"`` reads the names of the network's ``forward`` (once per class, :func:`inspect.signature`): one of
``encoder_hidden_states``, ``class_labels`` or ``added_cond_kwargs`` makes it ``"diffusers"`` (``UNet2DModel``,
``UNet2DConditionModel`` and any network written to their convention); otherwise it is ``"compvis"``. A wrapper whose
``forward`` takes only ``*args, **kwargs`` (a compiled module) is read as ``"compvis"``: name the convention for it.

:func:`call_denoiser` makes the call with the condition under the convention's name for it (``context`` →
``encoder_hidden_states``, ``vector`` → ``class_labels``) and unwraps diffusers' output. A diffusers UNet without a
class embedding would ignore ``class_labels``: a vector condition for one is refused. Its ``added_cond_kwargs`` (SDXL's
``text_embeds``/``time_ids``) go in a mapping condition to :meth:`~lightning_ldm.DiffusionMixin.apply_model`, which
spreads it. Before the call it checks that the network takes that name: a network that takes neither convention's
name gets a ``TypeError`` naming both, instead of an ``unexpected keyword argument`` from deep inside its ``forward``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from torch import Tensor, nn

from lightning_ldm._checks import check_choice

__all__ = [
    "CALL_CONVENTIONS",
    "CallConvention",
    "accepts_keyword",
    "call_denoiser",
    "resolve_call_convention",
    "unwrap_output",
]

CallConvention: TypeAlias = Literal["auto", "compvis", "diffusers"]
CALL_CONVENTIONS: tuple[str, ...] = ("auto", "compvis", "diffusers")
#: The keyword each convention gives a condition: a sequence (cross-attention) or a vector (class/ADM).
_NAMES: dict[str, dict[str, str]] = {
    "compvis": {"context": "context", "vector": "y"},
    "diffusers": {"context": "encoder_hidden_states", "vector": "class_labels"},
}
_DIFFUSERS_MARKS = frozenset({"encoder_hidden_states", "class_labels", "added_cond_kwargs"})
_BOTH = (
    "CompVis' model(x, t, context=..., y=...) (call_convention='compvis') or diffusers' model(sample, timestep, "
    "encoder_hidden_states=..., class_labels=...) (call_convention='diffusers')"
)


class _Signature:
    """The keyword names a network's ``forward`` takes, which of them are required, and whether it takes ``**kw``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: accept anything
            params = []
            self.var_keyword = True
        else:
            self.var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        keyword = (p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        self.params = {p.name: p.default is p.empty for p in keyword}  # name -> required
        self.text = "(...)" if not params else str(inspect.signature(fn))

    def takes(self, name: str) -> bool:
        return self.var_keyword or name in self.params


#: Per module class (a plain dict: ``torch.compile`` of torch 2.4 cannot trace a ``WeakKeyDictionary`` lookup).
_SIGNATURES: dict[type, _Signature] = {}


def _signature(model: Callable[..., Any]) -> _Signature:
    """The signature of ``model.forward`` (cached per class for modules) or of the callable itself."""
    if not isinstance(model, nn.Module):
        return _Signature(model)
    cls = type(model)
    if "forward" in model.__dict__:  # set on the instance, not the class's (``vars`` breaks torch 2.4's trace)
        return _Signature(model.forward)
    found = _SIGNATURES.get(cls)
    if found is None:
        found = _SIGNATURES[cls] = _Signature(model.forward)
    return found


def resolve_call_convention(model: Callable[..., Any], call_convention: str = "auto") -> str:
    """``"compvis"`` or ``"diffusers"``: ``call_convention`` itself, or for ``"auto"`` what ``model``'s signature says.

    Raises:
        ValueError: ``call_convention`` is not one of :data:`CALL_CONVENTIONS`.
    """
    check_choice("call_convention", call_convention, CALL_CONVENTIONS)
    if call_convention != "auto":
        return call_convention
    return "diffusers" if _DIFFUSERS_MARKS & set(_signature(model).params) else "compvis"


def accepts_keyword(model: Callable[..., Any], name: str) -> bool:
    """Whether ``model``'s ``forward`` takes the keyword argument ``name`` (by name or through ``**kwargs``)."""
    return _signature(model).takes(name)


def _name(model: Callable[..., Any]) -> str:
    return type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "__name__", type(model).__name__)


def _check_vector_input(model: Callable[..., Any]) -> None:
    """Refuse a class/vector condition for a diffusers UNet without a class embedding (which ignores ``class_labels``).

    Its other vector inputs (``added_cond_kwargs``, e.g. SDXL's ``text_embeds`` and ``time_ids``) take several tensors
    by name: pass them as a mapping condition to a :class:`~lightning_ldm.DiffusionMixin` network instead.
    """
    if getattr(model, "class_embedding", "absent") is None:
        raise ValueError(
            f"{_name(model)} has no class embedding (its config sets neither class_embed_type nor num_class_embeds), "
            "so it would ignore class_labels; a class/vector condition (conditioning_key='adm') needs one. Inputs "
            "under added_cond_kwargs go in a mapping condition to DiffusionMixin.apply_model"
        )


def _check_context_input(model: Callable[..., Any], context: Tensor) -> None:
    """Refuse a cross-attention condition a diffusers UNet cannot attend to: not ``(B, sequence, width)``.

    The width is read from the config: ``encoder_hid_dim`` when the UNet projects a text context first
    (``encoder_hid_dim_type`` ``"text_proj"``/``"text_image_proj"``), an integer ``cross_attention_dim`` when it has no
    projection; nothing is checked for the other projections (image embeddings) or a per-block tuple.
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    projection = getattr(config, "encoder_hid_dim_type", None)
    if projection is None:
        width = getattr(config, "cross_attention_dim", None)
    elif projection in ("text_proj", "text_image_proj"):
        width = getattr(config, "encoder_hid_dim", None)
    else:
        return
    if width is None:
        return
    if context.ndim != 3 or (isinstance(width, int) and context.shape[-1] != width):
        expected = f"(B, sequence, {width})" if isinstance(width, int) else "(B, sequence, width)"
        raise ValueError(
            f"the cross-attention condition (c_crossattn) has shape {tuple(context.shape)}; {_name(model)} takes "
            f"encoder_hidden_states of shape {expected}: one embedding per token, e.g. a text encoder's "
            "last hidden state"
        )


def call_denoiser(
    model: Callable[..., Any],
    x: Tensor,
    t: Tensor,
    convention: str,
    *,
    context: Tensor | None = None,
    vector: Tensor | None = None,
    routed_by: str = "the condition",
) -> Any:
    """Call ``model(x, t)`` with ``context``/``vector`` under ``convention``'s names; unwrap diffusers' output.

    Args:
        model: The denoising network.
        x: The network's input (noisy latents, with concatenated conditions).
        t: Timesteps, passed through unchanged.
        convention: ``"compvis"`` or ``"diffusers"`` (see :func:`resolve_call_convention`).
        context: A cross-attention condition (``context=`` / ``encoder_hidden_states=``), or ``None``.
        vector: A class/vector condition (``y=`` / ``class_labels=``), or ``None``.
        routed_by: What asks for the keywords, for the error message (e.g. ``"conditioning_key='adm'"``).

    Returns:
        The output (for ``"diffusers"``: its ``.sample``, or the first element of a ``return_dict=False`` tuple).

    Raises:
        TypeError: The network's ``forward`` does not take a keyword the call needs, or a diffusers-convention
            network returned neither a Tensor, an output with ``.sample`` nor a tuple.
        ValueError: A vector condition for a diffusers UNet that has no class embedding.
    """
    names = _NAMES[convention]
    sig = _signature(model)
    kwargs: dict[str, Any] = {}
    for role, given in (("context", context), ("vector", vector)):
        if given is None:
            continue
        keyword = names[role]
        if convention == "diffusers" and role == "vector":
            _check_vector_input(model)
        if convention == "diffusers" and role == "context":
            _check_context_input(model, given)
        if not sig.takes(keyword):
            raise TypeError(
                f"{routed_by} passes the condition as {keyword}= under call_convention={convention!r}, but "
                f"{_name(model)}.forward{sig.text} does not take it; a conditioned denoiser takes {_BOTH}"
            )
        kwargs[keyword] = given
    if convention == "compvis":
        return model(x, t, **kwargs)
    if sig.params.get("encoder_hidden_states") and "encoder_hidden_states" not in kwargs:
        kwargs["encoder_hidden_states"] = None  # UNet2DConditionModel requires it; None when it has no cross-attention
    return unwrap_output(model, model(x, t, **kwargs))


def unwrap_output(model: Callable[..., Any], out: Any) -> Tensor:
    """The prediction in a diffusers-convention output: the Tensor, its ``.sample``, or a tuple's first element.

    Raises:
        TypeError: ``out`` is none of these.
    """
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"{_name(model)} returned {type(out).__name__}; a diffusers-convention denoiser returns a Tensor, an output "
        "with a .sample Tensor, or a tuple whose first element is the prediction"
    )
