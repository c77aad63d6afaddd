"""``GradientCheckpointing``: activation checkpointing for chosen submodules, on for ``fit`` and off afterwards."""

from __future__ import annotations

import fnmatch
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.utils.checkpoint
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from lightning_ldm._checks import check_bool
from lightning_ldm.checkpointing import checkpoint as ldm_checkpoint

__all__ = ["GradientCheckpointing"]

ModuleSpec = type[nn.Module] | str


class GradientCheckpointing(Callback):
    r"""Turn on activation (gradient) checkpointing for chosen submodules during ``trainer.fit``.

    A submodule is chosen when it is an instance of one of the given types, or when its qualified name (as in
    ``named_modules()``, e.g. ``"net.blocks.3"``) matches one of the given strings (``fnmatch`` patterns:
    ``"net.blocks.*"``). Only the outermost chosen modules are checkpointed (a chosen module inside another chosen
    module is left alone); the LightningModule itself is never chosen.

    At fit start each chosen module either

    * has a boolean ``use_checkpoint`` attribute (CompVis' ``ResBlock``/``BasicTransformerBlock`` style): it is set
      to ``True``; or
    * gets its ``forward`` replaced by a picklable wrapper (a deep copy or a pickle of the module taken during fit
      runs its own weights, checkpointed) so that, when gradients are enabled, it runs through
      ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (or, with ``use_reentrant=True``,
      :func:`lightning_ldm.checkpoint`, passing the module's parameters; tensors given by keyword, such as a
      denoiser's ``context=``, are differentiated like positional ones). Both record the autocast state of the
      forward and recompute under it, so under ``precision="bf16-mixed"``/``"16-mixed"`` (where Lightning runs
      backward outside autocast) the gradients equal those of the uncheckpointed model; both restore the RNG state
      for the recomputation (dropout matches).

    At fit end (or when fit raises) every module is put back as it was.

    Args:
        modules: Non-empty sequence of ``nn.Module`` subclasses and/or name patterns.
        use_reentrant: Use the reentrant checkpoint (:func:`lightning_ldm.checkpoint`) instead of torch's
            non-reentrant one. Not supported with DDP's ``find_unused_parameters=True``.

    Raises:
        TypeError: ``modules`` is not a sequence of ``nn.Module`` subclasses and strings, or ``use_reentrant`` is not
            a bool.
        ValueError: ``modules`` is empty or holds an empty string.
    """

    def __init__(self, modules: Sequence[ModuleSpec], use_reentrant: bool = False) -> None:
        if isinstance(modules, (str, type)) or not isinstance(modules, Sequence):
            raise TypeError(
                "modules must be a sequence (list/tuple) of nn.Module subclasses and/or name patterns, "
                f"got {modules!r} of type {type(modules).__name__}"
            )
        if len(modules) == 0:
            raise ValueError("modules is empty; name at least one nn.Module subclass or module name pattern")
        for spec in modules:
            if isinstance(spec, str):
                if not spec:
                    raise ValueError("modules holds an empty string; expected a module name or fnmatch pattern")
            elif not (isinstance(spec, type) and issubclass(spec, nn.Module)):
                raise TypeError(
                    f"modules holds {spec!r} of type {type(spec).__name__}; expected nn.Module subclasses or "
                    "module name patterns (str)"
                )
        self.modules: tuple[ModuleSpec, ...] = tuple(modules)
        self.use_reentrant = check_bool("use_reentrant", use_reentrant)
        #: Qualified names of the modules checkpointed in the current fit.
        self.checkpointed_names: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse strategies that clash with this callback.

        Raises:
            ValueError: The strategy is FSDP (use its ``activation_checkpointing_policy``), or ``use_reentrant=True``
                with DDP's ``find_unused_parameters=True``.
        """
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                "GradientCheckpointing does not stack on FSDP, which applies its own activation checkpointing: "
                "remove the callback and pass FSDPStrategy(activation_checkpointing_policy={...}) instead"
            )
        if (
            self.use_reentrant
            and isinstance(strategy, DDPStrategy)
            and getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            raise ValueError(
                "GradientCheckpointing(use_reentrant=True) fails under DDP with find_unused_parameters=True "
                "('marked as ready twice'); use use_reentrant=False"
            )

    def _select(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        types = tuple(spec for spec in self.modules if isinstance(spec, type))
        patterns = [spec for spec in self.modules if isinstance(spec, str)]
        hits: dict[ModuleSpec, int] = dict.fromkeys(self.modules, 0)
        chosen: list[tuple[str, nn.Module]] = []
        for name, module in root.named_modules():
            if not name:
                continue
            matched: list[ModuleSpec] = [t for t in types if isinstance(module, t)]
            matched += [p for p in patterns if fnmatch.fnmatchcase(name, p)]
            if not matched:
                continue
            for spec in matched:
                hits[spec] += 1
            if not any(name.startswith(outer + ".") for outer, _ in chosen):
                chosen.append((name, module))
        missing = [spec for spec, count in hits.items() if count == 0]
        if missing:
            shown = ", ".join(spec if isinstance(spec, str) else spec.__name__ for spec in missing)
            names = [name for name, _ in root.named_modules() if name]
            listing = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(
                f"GradientCheckpointing: {shown} matched no submodule of {type(root).__name__}; its submodules are: "
                f"{listing}"
            )
        return chosen

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Switch checkpointing on for the chosen submodules.

        Raises:
            ValueError: A type or name pattern matches no submodule (the message lists the submodules).
        """
        self._restore()
        chosen = self._select(pl_module)
        for _, module in chosen:
            previous = getattr(module, "use_checkpoint", None)
            if isinstance(previous, bool):
                self._undo.append(functools.partial(setattr, module, "use_checkpoint", previous))
                setattr(module, "use_checkpoint", True)  # noqa: B010 (an attribute of an arbitrary module)
            else:
                self._undo.append(_wrap_forward(module, self.use_reentrant))
        self.checkpointed_names = [name for name, _ in chosen]

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.checkpointed_names = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put every chosen module back as it was."""
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put every chosen module back as it was."""
        self._restore()


class _CheckpointedForward:
    """The ``forward`` that :class:`GradientCheckpointing` puts on a module: checkpointed when grad is enabled.

    A plain object holding the module (not a closure), so that ``copy.deepcopy`` and ``pickle`` of the module carry
    it along pointing at the *copy* (its weights), and the copy keeps checkpointing.

    Args:
        module: The module whose ``forward`` this replaces.
        use_reentrant: Use :func:`lightning_ldm.checkpoint` (reentrant) instead of torch's non-reentrant one.
        previous: The instance-level ``forward`` the module had before, or ``None`` to call its class's ``forward``.
    """

    def __init__(self, module: nn.Module, use_reentrant: bool, previous: Callable[..., Any] | None) -> None:
        self.module = module
        self.use_reentrant = use_reentrant
        self.previous = previous

    def _inner(self) -> Callable[..., Any]:
        if self.previous is not None:
            return self.previous
        return types.MethodType(type(self.module).forward, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's own ``forward``, through a checkpoint when gradients are enabled."""
        original = self._inner()
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if self.use_reentrant:
            # keyword arguments (a denoiser's context=/y=) travel positionally through the reentrant engine, so the
            # module that produced them gets its gradient (a functools.partial would freeze them as constants)
            return ldm_checkpoint(original, args, tuple(self.module.parameters()), True, kwargs=kwargs)
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)


def _wrap_forward(module: nn.Module, use_reentrant: bool) -> Callable[[], None]:
    """Make ``module.forward`` checkpointed (when grad is enabled); return the function that undoes it."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = _CheckpointedForward(module, use_reentrant, previous if had_own else None)

    def undo() -> None:
        if had_own:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo
