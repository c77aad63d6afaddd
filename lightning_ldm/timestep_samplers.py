r"""Timestep samplers: which training timesteps ``t`` a diffusion loss sees.

A sampler draws ``t ∈ {0, …, T − 1}`` for a batch. :class:`~lightning_ldm.callbacks.DiffusionSeedCallback` installs one
on a :class:`~lightning_ldm.mixin.DiffusionMixin` (attribute ``timestep_sampler``), whose ``sample_timesteps`` then
calls :meth:`TimestepSampler.sample` with the module's generator.

===========================  =============================================================================
sampler                      distribution of ``t``
===========================  =============================================================================
:class:`UniformSampler`      ``p(t) = 1/T`` (DDPM)
:class:`LossAwareSampler`    ``p(t) ∝ √E[L_t²]`` over the last losses seen at ``t`` (improved-diffusion's
                             ``LossSecondMomentResampler``), mixed with a little uniform; uniform until every
                             ``t`` has a full history. Pair with :meth:`TimestepSampler.importance_weights`.
:class:`LogitNormalSampler`  ``u = sigmoid(m + s·n)``, ``n ~ N(0, 1)``; ``t = min(⌊u·T⌋, T − 1)`` (SD3)
===========================  =============================================================================

Everything here is torch only (no Lightning), and every draw goes through the ``generator`` given to
:meth:`~TimestepSampler.sample`, so a seeded generator reproduces the draws exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_ldm._checks import check_int, check_real

__all__ = ["LogitNormalSampler", "LossAwareSampler", "TimestepSampler", "UniformSampler"]


def _draw_uniform(batch_size: int, num_timesteps: int, device: torch.device | str | None, generator: Any) -> Tensor:
    return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator, dtype=torch.long)


def _check_sample_args(batch_size: int, num_timesteps: int) -> tuple[int, int]:
    return check_int("batch_size", batch_size, minimum=0), check_int("num_timesteps", num_timesteps, minimum=1)


class TimestepSampler:
    """Base class of the timestep samplers: the interface a :class:`~lightning_ldm.mixin.DiffusionMixin` calls.

    Subclasses implement :meth:`sample`; those that learn from the losses set :attr:`needs_losses` and implement
    :meth:`update`; those with state implement :meth:`state_dict` / :meth:`load_state_dict`. A sampler that draws
    ``t`` from a distribution other than the uniform one, and wants the loss to stay an unbiased estimate of the
    uniform-``t`` objective, returns ``1/(T·p(t))`` from :meth:`importance_weights`.
    """

    #: Whether :meth:`update` uses the losses (the callback gathers them across ranks only for such samplers).
    needs_losses: bool = False

    def sample(
        self,
        batch_size: int,
        num_timesteps: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` timesteps in ``[0, num_timesteps)``.

        Args:
            batch_size: Number of timesteps to draw (>= 0).
            num_timesteps: Number of training timesteps ``T`` of the schedule (>= 1).
            device: Device of the result (the generator's device when one is given).
            generator: Source of randomness; ``None`` uses torch's global generator.

        Returns:
            ``torch.long`` tensor of shape ``(batch_size,)``.
        """
        raise NotImplementedError

    def prepare(self, num_timesteps: int) -> None:
        """Fix the number of timesteps ``T`` before the first draw (the callback calls it in ``setup``).

        Args:
            num_timesteps: ``T`` of the schedule the sampler will serve.
        """

    def importance_weights(self, t: Tensor, num_timesteps: int) -> Tensor | None:
        """Per-sample loss weights ``1/(T·p(t))`` that make the weighted loss unbiased for uniform ``t``.

        Args:
            t: Timesteps drawn by :meth:`sample`.
            num_timesteps: ``T``.

        Returns:
            ``None`` (the default: use the losses unweighted), or float32 weights shaped like ``t``.
        """
        return None

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Feed the per-sample training losses observed at timesteps ``t`` (no-op by default).

        Args:
            t: Integer timesteps, shape ``(N,)``.
            losses: Per-sample losses at those timesteps, shape ``(N,)``.
        """

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler's state (empty for stateless samplers)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict` (no-op for stateless samplers).

        Args:
            state_dict: A dict from :meth:`state_dict`.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformSampler(TimestepSampler):
    """``t ~ U{0, …, T − 1}``: ``torch.randint(0, T, (B,), generator=generator)``."""

    def sample(
        self,
        batch_size: int,
        num_timesteps: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` timesteps uniformly (see :meth:`TimestepSampler.sample`).

        Raises:
            TypeError: ``batch_size`` or ``num_timesteps`` is not an integer.
            ValueError: ``batch_size < 0`` or ``num_timesteps < 1``.
        """
        batch_size, num_timesteps = _check_sample_args(batch_size, num_timesteps)
        return _draw_uniform(batch_size, num_timesteps, device, generator)


class LogitNormalSampler(TimestepSampler):
    r"""Logit-normal timesteps (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3).

    ``u = sigmoid(mean + std·n)`` with ``n ~ N(0, 1)``, so ``u ∈ (0, 1)``; the discrete timestep is
    ``t = min(⌊u·T⌋, T − 1)``: the interval ``[k/T, (k + 1)/T)`` of ``u`` maps to ``t = k``, and the clamp only
    catches ``u`` rounding to 1 in float32. Hence

    ``P(t = k) = Φ((logit((k + 1)/T) − mean)/std) − Φ((logit(k/T) − mean)/std)``

    with ``logit(0) = −∞`` and ``logit(1) = +∞``. ``mean = 0, std = 1`` (SD3's choice) puts most mass on the middle
    timesteps; a positive ``mean`` shifts it towards the noisy end. No importance weights: the non-uniform
    emphasis is the point of this sampler.

    Args:
        mean: Location ``m`` of the normal in logit space (finite).
        std: Scale ``s`` of the normal in logit space (> 0).

    Raises:
        TypeError: ``mean`` or ``std`` is not a real number.
        ValueError: ``mean`` is not finite or ``std <= 0``.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = check_real("mean", mean)
        self.std = check_real("std", std, minimum=0.0, min_inclusive=False)

    def probabilities(self, num_timesteps: int) -> Tensor:
        """Exact ``P(t = k)`` for ``k = 0 … T − 1`` (float64), from the formula in the class docstring.

        Args:
            num_timesteps: ``T`` (>= 1).

        Returns:
            float64 tensor of shape ``(T,)`` summing to 1.
        """
        num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
        edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        z = (torch.logit(edges) - self.mean) / self.std  # logit(0) = -inf, logit(1) = +inf
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return cdf[1:] - cdf[:-1]

    def sample(
        self,
        batch_size: int,
        num_timesteps: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` logit-normal timesteps (see the class docstring for the mapping).

        Raises:
            TypeError: ``batch_size`` or ``num_timesteps`` is not an integer.
            ValueError: ``batch_size < 0`` or ``num_timesteps < 1``.
        """
        batch_size, num_timesteps = _check_sample_args(batch_size, num_timesteps)
        n = torch.randn((batch_size,), device=device, generator=generator, dtype=torch.float32)
        u = torch.sigmoid(n * self.std + self.mean)
        return (u * num_timesteps).floor().long().clamp_(0, num_timesteps - 1)

    def __repr__(self) -> str:
        return f"LogitNormalSampler(mean={self.mean:g}, std={self.std:g})"


class LossAwareSampler(TimestepSampler):
    r"""Importance sampling of ``t`` by the second moment of its recent losses (Nichol & Dhariwal 2021).

    Keeps the last ``history_per_term`` losses seen at each timestep. Until every timestep has a full history it
    draws uniformly (the very same draw as :class:`UniformSampler`); afterwards

    ``w_t = √(mean of the stored L_t²)``,  ``p(t) = (1 − ε)·w_t / Σ w + ε/T``  (``ε = uniform_prob``)

    and :meth:`importance_weights` returns ``1/(T·p(t))``: multiplying each sample's loss by it keeps the loss an
    unbiased estimate of the uniform-``t`` objective (improved-diffusion's ``LossSecondMomentResampler``).

    Under DDP every rank must feed the same (gathered) losses in the same order so that the samplers stay identical;
    :class:`~lightning_ldm.callbacks.DiffusionSeedCallback` does this.

    Args:
        history_per_term: Losses kept per timestep (>= 1).
        uniform_prob: Mixing weight ``ε`` of the uniform distribution, in [0, 1].

    Raises:
        TypeError: ``history_per_term`` is not an integer or ``uniform_prob`` not a real number.
        ValueError: ``history_per_term < 1`` or ``uniform_prob`` outside [0, 1].
    """

    needs_losses = True

    def __init__(self, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        self.history_per_term = check_int("history_per_term", history_per_term, minimum=1)
        self.uniform_prob = check_real("uniform_prob", uniform_prob, minimum=0.0, maximum=1.0)
        self._num_timesteps: int | None = None
        self._loss_history = torch.zeros(0, self.history_per_term, dtype=torch.float64)
        self._loss_counts = torch.zeros(0, dtype=torch.long)

    # -- state -----------------------------------------------------------------------------------------------------
    def _ensure_size(self, num_timesteps: int) -> None:
        if self._num_timesteps is None:
            self._num_timesteps = num_timesteps
            self._loss_history = torch.zeros(num_timesteps, self.history_per_term, dtype=torch.float64)
            self._loss_counts = torch.zeros(num_timesteps, dtype=torch.long)
        elif self._num_timesteps != num_timesteps:
            raise ValueError(
                f"num_timesteps={num_timesteps} differs from the {self._num_timesteps} timesteps this "
                "LossAwareSampler has a loss history for; use a new sampler for a different schedule"
            )

    def prepare(self, num_timesteps: int) -> None:
        """Allocate the loss history for ``num_timesteps`` timesteps (no-op when it already has that size).

        Args:
            num_timesteps: ``T`` (>= 1).

        Raises:
            ValueError: The sampler already holds a history for a different ``T``.
        """
        self._ensure_size(check_int("num_timesteps", num_timesteps, minimum=1))

    @property
    def warmed_up(self) -> bool:
        """Whether every timestep has ``history_per_term`` losses (before that the draws are uniform)."""
        return self._num_timesteps is not None and bool((self._loss_counts == self.history_per_term).all())

    def probabilities(self, num_timesteps: int) -> Tensor:
        """Current ``p(t)`` for ``t = 0 … T − 1`` (float64; uniform before warm-up).

        Args:
            num_timesteps: ``T`` (>= 1); must match the history once there is one.

        Returns:
            float64 tensor of shape ``(T,)`` summing to 1.

        Raises:
            ValueError: ``num_timesteps`` differs from the size of the history.
        """
        num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
        self._ensure_size(num_timesteps)
        if not self.warmed_up:
            return torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)
        w = self._loss_history.pow(2).mean(dim=-1).sqrt()
        total = w.sum()
        if not total > 0:  # all-zero losses: nothing to prefer
            return torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)
        return w / total * (1.0 - self.uniform_prob) + self.uniform_prob / num_timesteps

    def sample(
        self,
        batch_size: int,
        num_timesteps: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` timesteps from :meth:`probabilities` (uniformly before warm-up).

        Raises:
            TypeError: ``batch_size`` or ``num_timesteps`` is not an integer.
            ValueError: ``batch_size < 0``, ``num_timesteps < 1`` or ``num_timesteps`` differs from the history.
        """
        batch_size, num_timesteps = _check_sample_args(batch_size, num_timesteps)
        self._ensure_size(num_timesteps)
        if not self.warmed_up or batch_size == 0:
            return _draw_uniform(batch_size, num_timesteps, device, generator)
        gen_device = generator.device if generator is not None else device
        p = self.probabilities(num_timesteps).to(device=gen_device, dtype=torch.float32)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t.to(device)

    def importance_weights(self, t: Tensor, num_timesteps: int) -> Tensor:
        """``1/(T·p(t))`` per sample, float32 on ``t``'s device (all ones before warm-up).

        Args:
            t: Timesteps drawn by :meth:`sample`.
            num_timesteps: ``T``.

        Returns:
            float32 tensor shaped like ``t``.
        """
        p = self.probabilities(num_timesteps).to(t.device)
        return (1.0 / (num_timesteps * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each loss to the history of its timestep (oldest dropped once ``history_per_term`` are kept).

        Samples are taken in order, so a timestep drawn twice in a batch gets both losses, the later one newest.

        Args:
            t: Integer timesteps in ``[0, T)``, shape ``(N,)``; ``T`` is fixed by the first call to
                :meth:`prepare`, :meth:`sample` or :meth:`probabilities` (it is not guessed from ``t``).
            losses: Per-sample losses, shape ``(N,)``, finite.

        Raises:
            ValueError: The shapes differ, ``t`` is out of range, a loss is not finite, or nothing has fixed ``T``.
        """
        if self._num_timesteps is None:
            raise ValueError(
                "LossAwareSampler.update() before the number of timesteps is known; call prepare(T) or sample() first"
            )
        t_cpu = t.detach().reshape(-1).to("cpu", torch.long)
        l_cpu = losses.detach().reshape(-1).to("cpu", torch.float64)
        if t_cpu.shape != l_cpu.shape:
            raise ValueError(
                f"t and losses must have the same number of entries, got {t_cpu.numel()} and {l_cpu.numel()}"
            )
        if t_cpu.numel() == 0:
            return
        if int(t_cpu.min()) < 0 or int(t_cpu.max()) >= self._num_timesteps:
            raise ValueError(f"t holds a timestep outside [0, {self._num_timesteps - 1}]: {t_cpu.tolist()}")
        if not torch.isfinite(l_cpu).all():
            raise ValueError(f"losses must be finite, got {l_cpu.tolist()}")
        history, counts, full = self._loss_history, self._loss_counts, self.history_per_term
        for step, loss in zip(t_cpu.tolist(), l_cpu.tolist(), strict=True):
            n = int(counts[step])
            if n == full:
                history[step, :-1] = history[step, 1:].clone()
                history[step, -1] = loss
            else:
                history[step, n] = loss
                counts[step] = n + 1

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"num_timesteps", "history_per_term", "uniform_prob", "loss_history", "loss_counts"}`` (CPU)."""
        return {
            "num_timesteps": self._num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": self._loss_history.clone(),
            "loss_counts": self._loss_counts.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the loss history saved by :meth:`state_dict`.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            KeyError: A key is missing.
            ValueError: ``history_per_term`` differs from this sampler's, or the tensors have the wrong shape.
        """
        missing = [
            k for k in ("num_timesteps", "history_per_term", "loss_history", "loss_counts") if k not in state_dict
        ]
        if missing:
            raise KeyError(f"LossAwareSampler state is missing {missing}; got keys {sorted(state_dict)}")
        if int(state_dict["history_per_term"]) != self.history_per_term:
            raise ValueError(
                f"saved history_per_term={state_dict['history_per_term']} differs from this sampler's "
                f"history_per_term={self.history_per_term}"
            )
        num_timesteps = state_dict["num_timesteps"]
        history = torch.as_tensor(state_dict["loss_history"], dtype=torch.float64).cpu().clone()
        counts = torch.as_tensor(state_dict["loss_counts"], dtype=torch.long).cpu().clone()
        rows = 0 if num_timesteps is None else int(num_timesteps)
        if history.shape != (rows, self.history_per_term) or counts.shape != (rows,):
            raise ValueError(
                f"saved loss_history {tuple(history.shape)} / loss_counts {tuple(counts.shape)} do not match "
                f"num_timesteps={num_timesteps} and history_per_term={self.history_per_term}"
            )
        self._num_timesteps = None if num_timesteps is None else rows
        self._loss_history, self._loss_counts = history, counts

    def __repr__(self) -> str:
        return f"LossAwareSampler(history_per_term={self.history_per_term}, uniform_prob={self.uniform_prob:g})"
