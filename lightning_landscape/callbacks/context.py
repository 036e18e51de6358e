"""What a measurement sees (:class:`MeasureContext`), and one try of it inside the guard;
:class:`Pausable`, the callbacks paused for the duration."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch

from lightning_landscape.callbacks.shared import SolveRequest, module_loss, shared_state
from lightning_landscape.measures.eigen import EigenEstimate
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.operators import ProbeHessian

if TYPE_CHECKING:
    from lightning_landscape.callbacks.base import MeasurementCallback

__all__ = ["MeasureContext", "Pausable", "pauses"]


@runtime_checkable
class Pausable(Protocol):
    """A callback whose work must stop while a measurement runs (e.g. ``KFAC``: measurement
    forwards and backwards must not reach its factors). Implement :meth:`paused`; declaring
    the protocol as a base class (``class MyCallback(Callback, Pausable)``) documents it."""

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the callback records nothing (re-entrant)."""
        ...


def pauses(trainer: pl.Trainer, caller: object) -> list[contextlib.AbstractContextManager[Any]]:
    """``paused()`` of every other :class:`Pausable` callback, entered by the guard for the
    duration of a measurement (and of a probe calibration)."""
    return [
        cb.paused()
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if cb is not caller and isinstance(cb, Pausable)
    ]


class MeasureContext:
    """What a measurement sees: the module, its probe operator, the optimizer, the shared solve."""

    def __init__(
        self,
        callback: MeasurementCallback,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        due: frozenset[str] = frozenset({"measure"}),
    ) -> None:
        self.callback = callback
        self.trainer = trainer
        self.pl_module = pl_module
        #: the parts of the callback's schedule due now
        self.due = due
        self.step = trainer.global_step
        self.probe = callback.probe
        self.loss_fn = module_loss(pl_module)
        self._operators: dict[tuple[str, ...] | None, ProbeHessian] = {}
        # seconds to take off this callback's own bill: a shared solve is charged in equal
        # shares to every callback it was computed for, whoever happened to compute it
        self.cost_adjustment = 0.0

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        opts = self.trainer.optimizers
        return opts[0] if opts else None

    def operator(self, params: list[str] | None = None) -> ProbeHessian:
        """The probe Hessian over all trainable parameters, or over the named ones."""
        key = None if params is None else tuple(params)
        if key not in self._operators:
            assert self.probe is not None
            self._operators[key] = ProbeHessian(
                self.pl_module, self.probe, self.loss_fn, params=params
            )
        return self._operators[key]

    def top_k(self, request: SolveRequest) -> EigenEstimate:
        """The shared top-k solve of the full probe Hessian at this step, computed once for
        this callback and the peers the run's decision of this step made due (with the same
        probe and guard options), with the largest ``k`` any of them asks for."""
        cb = self.callback
        shared = shared_state(self.trainer)
        requests = [request]
        for peer in cb._peers(self.trainer):
            ask = peer.solve_request() if peer is not cb else None
            if (
                ask is not None
                and peer.solve_key == cb.solve_key
                and shared.is_due(peer, self.step)
            ):
                requests.append(ask)
        solve, computed = shared.top_k(cb.solve_key, self.step, self.operator(), requests, cb.seed)
        self.cost_adjustment += solve.share - (solve.seconds if computed else 0.0)
        return solve.estimate

    def run(self) -> tuple[dict[str, float] | None, Exception | None]:
        """One try of the callback's ``measure`` in the guard: ``(metrics, None)`` or, unless
        the callback is ``strict``, ``(None, error)``; the operators' graphs are let go."""
        cb = self.callback
        try:
            with guard(
                self.pl_module,
                bn=cb.bn,
                dropout=cb.dropout,
                seed=cb.seed,
                pauses=pauses(self.trainer, cb),
            ):
                return cb.measure(self, self.due), None
        except Exception as err:
            if cb.strict:
                raise
            return None, err
        finally:
            for op in self._operators.values():
                op.release()
