"""What measurement callbacks on one Trainer share: the loss, probes and top-k solves.

- :func:`module_loss` — the loss a measurement differentiates: ``landscape_loss(batch)`` if the
  LightningModule defines it, else ``training_step(batch, 0)`` with ``self.log``/``log_dict``
  silenced (nothing spurious may reach the loggers) and the loss taken from a tensor or
  ``["loss"]``.
- :class:`Shared` — the run-scoped object, one per fit (:func:`open_run` in ``setup``,
  :func:`close_run` in ``teardown``, kept beside the Trainer in a weak mapping, never as an
  attribute on it; a second ``fit`` or a new Trainer captures a fresh probe): the decision of
  which callbacks are due at the current step (:meth:`Shared.due_at`, taken once per step for
  all of them), probes keyed by their configuration (two
  callbacks with the same probe options hold one probe), and the top-k eigen solves of the
  current step, so when ``Sharpness`` and ``HessianEigenvalues`` measure at the same step λ_max
  is computed once (with ``k`` = the largest any due callback asks for), warm-started from the
  last solve. The warm start of each solve key is checkpointed once, by its *owner* (the first
  callback with that key).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_landscape.callbacks.schedule import Event, decide
from lightning_landscape.measures.eigen import EigenEstimate, top_eigen
from lightning_landscape.measures.operators import ProbeHessian

if TYPE_CHECKING:
    from lightning_landscape.callbacks.base import MeasurementCallback

__all__ = [
    "LossExtractionError",
    "Shared",
    "Solve",
    "SolveRequest",
    "close_run",
    "module_loss",
    "open_run",
    "shared_state",
]


class LossExtractionError(TypeError):
    """``training_step`` gave nothing a measurement can differentiate at a measured step."""


_LOSS_HINT = (
    "define `landscape_loss(self, batch) -> Tensor` on the LightningModule so measurements "
    "know which loss to differentiate"
)


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``module.log``/``module.log_dict`` into no-ops for the duration."""
    had = {name: name in vars(module) for name in ("log", "log_dict")}
    module.log = _noop  # type: ignore[method-assign]
    module.log_dict = _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, present in had.items():
            if not present:
                delattr(module, name)


def _extract_loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor):
        what = (
            "None"
            if out is None
            else "a dict without a 'loss' tensor"
            if isinstance(out, dict)
            else f"a {type(out).__name__}"
        )
        raise LossExtractionError(
            f"training_step returned {what}, not a loss tensor or a dict with a 'loss' tensor; "
            + _LOSS_HINT
        )
    if loss.numel() != 1:
        raise LossExtractionError(
            f"training_step returned a loss of shape {tuple(loss.shape)}, not a scalar; "
            + _LOSS_HINT
        )
    return loss.reshape(())


def module_loss(pl_module: pl.LightningModule) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The ``loss_fn(model, batch)`` measurements use for ``pl_module``."""
    custom = getattr(pl_module, "landscape_loss", None)
    if callable(custom):
        return lambda model, batch: model.landscape_loss(batch)  # type: ignore[operator]
    if not pl_module.automatic_optimization:
        raise LossExtractionError("with manual optimization, " + _LOSS_HINT)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        assert isinstance(model, pl.LightningModule)
        with silenced_logging(model):
            return _extract_loss(model.training_step(batch, 0))

    return loss_fn


@dataclass(frozen=True)
class SolveRequest:
    """What one callback needs from the shared top-k solve at a step."""

    k: int
    max_iter: int
    tol: float
    bottom: bool = False


@dataclass(frozen=True)
class Solve:
    """A shared top-k solve, its wall time and how many callbacks it was computed for."""

    estimate: EigenEstimate
    seconds: float
    shares: int

    @property
    def share(self) -> float:
        """The part of the solve's time each participating callback is charged."""
        return self.seconds / self.shares


@dataclass
class Shared:
    """Per-Trainer state shared by measurement callbacks (not checkpointed itself)."""

    probes: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    solves: dict[tuple[Any, ...], Solve] = field(default_factory=dict)
    warm: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    layout_written: bool = False
    busy: float = 0.0  # wall seconds measured by all callbacks since training (re)started
    #: solve key -> id of the callback that checkpoints that key's warm start
    owners: dict[tuple[Any, ...], int] = field(default_factory=dict)
    #: probe key -> the global size chosen for an automatic probe
    auto_sizes: dict[tuple[Any, ...], int] = field(default_factory=dict)
    #: the latest decision of which callbacks are due (``id`` -> due parts), and its
    #: ``(event, step)`` (see :func:`~lightning_landscape.callbacks.schedule.decide`)
    due: dict[int, frozenset[str]] = field(default_factory=dict)
    decided: tuple[str, int] | None = None

    def due_at(
        self, trainer: pl.Trainer, peers: Sequence[MeasurementCallback], event: Event
    ) -> dict[int, frozenset[str]]:
        """The due parts of every peer at ``event`` of the current step, decided once for the
        run (:func:`~lightning_landscape.callbacks.schedule.decide`: one collective at most)."""
        key = (event, trainer.global_step)
        if self.decided != key:
            self.due, self.decided = decide(trainer, peers, event, self.busy), key
        return self.due

    def is_due(self, callback: object, step: int) -> bool:
        """Whether the run's decision at ``step`` (training start or after the optimizer step)
        made ``callback`` measure."""
        return (
            self.decided is not None
            and self.decided[1] == step
            and bool(self.due.get(id(callback)))
        )

    def top_k(
        self,
        key: tuple[Any, ...],
        step: int,
        operator: ProbeHessian,
        requests: list[SolveRequest],
        seed: int,
    ) -> tuple[Solve, bool]:
        """The top-k solve of ``operator`` at ``step``, computed once for all ``requests``.

        Returns the solve and whether this call computed it (``False``: served from the solve
        another callback computed at this step). The fresh random directions of the solve are
        drawn from ``seed`` and ``step`` (the same on every rank, different at every step), so
        that a direction the warm start misses at one step is looked for anew at the next.
        """
        cached = self.solves.get((step, key))
        k = max(r.k for r in requests)
        if cached is not None and cached.estimate.eigenvalues.numel() >= k:
            return cached, False
        self.solves = {}  # previous steps are never needed again
        warm = self.warm.get(key)
        start = time.perf_counter()
        est = top_eigen(
            operator,
            k=k,
            max_iter=max(r.max_iter for r in requests),
            tol=min(r.tol for r in requests),
            bottom=any(r.bottom for r in requests),
            warm_start=None if warm is None else warm.to(operator.device, operator.dtype),
            seed=(seed * 1_000_003 + step) % 2**63,
        )
        solve = Solve(est, time.perf_counter() - start, len(requests))
        self.solves[(step, key)] = solve
        self.warm[key] = est.warm_start().detach()
        return solve, True


_RUNS: weakref.WeakKeyDictionary[pl.Trainer, Shared] = weakref.WeakKeyDictionary()


def open_run(trainer: pl.Trainer) -> Shared:
    """Start a fresh :class:`Shared` for ``trainer`` (called in ``setup``)."""
    _RUNS[trainer] = Shared()
    return _RUNS[trainer]


def close_run(trainer: pl.Trainer) -> None:
    """Drop ``trainer``'s :class:`Shared` (called in ``teardown``): probes and graphs go."""
    _RUNS.pop(trainer, None)


def shared_state(trainer: pl.Trainer) -> Shared:
    """The :class:`Shared` object of ``trainer``'s current run (created on first use)."""
    state = _RUNS.get(trainer)
    if state is None:
        state = open_run(trainer)
    return state
