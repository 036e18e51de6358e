"""Which of a callback's sub-measurements are due, and when: :class:`Schedule`.

A schedule maps each *part* of a measurement (``"measure"``; ``GradientFlowDeviation``'s
``"gap"`` and ``"window_end"``; ``LossLandscape``'s ``"surface"``) to triggers. The base class
asks it at four *events* — ``"start"`` (training starts, before the first optimizer step),
``"step"`` (after an optimizer step), ``"epoch_end"`` and ``"end"`` (training ends, process
group and loggers still up) — and calls ``measure(ctx, due)`` with the set of due parts.

Triggers:

- :class:`Budgeted` — the callback's :class:`~lightning_landscape.callbacks.cadence.Cadence`
  (budget plan, ``every_n_steps`` or a ``schedule`` callable), plus step 0 at ``"start"``. A
  budget decision reads clocks, which differ between ranks, so it is rank 0's: see
  :func:`decide`;
- :class:`AtSteps` — after the optimizer step that brings ``global_step`` to one of them
  (``0``: at ``"start"``); :class:`EveryNEpochs`; :class:`AtEnd`;
- :class:`Windows` — a window of ``length`` steps opened every ``every`` steps (by the
  callback, which snapshots what it needs) is due to end ``length`` steps later.

``once_per_step`` (``LossLandscape``): a step is measured at most once, whatever the events.

:func:`decide` takes the decision of *every* measurement callback of the run at once, before
any of them measures, with one collective (rank 0's budget decisions broadcast together) only
at steps where some budget has a check. So a callback sharing a solve asks which peers are due
from that decision (:attr:`~lightning_landscape.callbacks.shared.Shared.due`), never a peer's
cadence from inside its own guard.

Example::

    >>> from lightning_landscape.callbacks.cadence import Cadence
    >>> s = Schedule({"surface": [AtSteps([0, 5]), AtEnd()]}, Cadence(every_n_steps=1))
    >>> s.local("start", 0), s.local("step", 3), s.local("step", 5), s.local("end", 9)
    (frozenset({'surface'}), frozenset(), frozenset({'surface'}), frozenset({'surface'}))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning_landscape.callbacks import reporting
from lightning_landscape.callbacks.cadence import Cadence

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_landscape.callbacks.base import MeasurementCallback

__all__ = [
    "AtEnd",
    "AtSteps",
    "Budgeted",
    "Event",
    "EveryNEpochs",
    "Schedule",
    "Trigger",
    "Windows",
    "account",
    "decide",
]

Event = Literal["start", "step", "epoch_end", "end"]


class Trigger:
    """A rule that makes a part due at an event (deterministic: the same on every rank)."""

    def due(self, event: Event, step: int, epoch: int) -> bool:
        raise NotImplementedError


@dataclass
class Budgeted(Trigger):
    """The cadence's steps (decided by :func:`decide`) and, with ``at_start``, step 0."""

    cadence: Cadence
    at_start: bool = True

    def due(self, event: Event, step: int, epoch: int) -> bool:
        if event == "start":
            return self.at_start and step == 0
        # not budgeted: a check step is a measured step; budgeted: see Schedule.propose
        return event == "step" and self.cadence.is_check(step) and not self.cadence.budgeted


@dataclass
class AtSteps(Trigger):
    steps: Sequence[int]

    def __post_init__(self) -> None:
        self.steps = sorted(set(self.steps))

    def due(self, event: Event, step: int, epoch: int) -> bool:
        if event == "start":
            return step == 0 and 0 in self.steps
        return event == "step" and step in self.steps


@dataclass
class EveryNEpochs(Trigger):
    n: int

    def due(self, event: Event, step: int, epoch: int) -> bool:
        return event == "epoch_end" and (epoch + 1) % self.n == 0


class AtEnd(Trigger):
    def due(self, event: Event, step: int, epoch: int) -> bool:
        return event == "end"


@dataclass
class Windows(Trigger):
    """Windows of ``length`` steps starting at multiples of ``every``; the open one (its start
    and the effective step of each of its optimizer steps) is checkpointed as ``"window"``."""

    length: int
    every: int | None
    start: int | None = None
    times: list[float] = field(default_factory=list)

    def starts_at(self, step: int) -> bool:
        return self.length > 0 and self.every is not None and step % self.every == 0

    def open(self, step: int) -> None:
        self.start, self.times = step, []

    def close(self) -> None:
        self.start, self.times = None, []

    @property
    def is_open(self) -> bool:
        return self.start is not None

    def due(self, event: Event, step: int, epoch: int) -> bool:
        return event == "step" and self.start is not None and step >= self.start + self.length

    def state_dict(self) -> dict[str, Any]:
        w = None if self.start is None else {"start": self.start, "times": list(self.times)}
        return {"window": w}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        w = state.get("window")
        if w is None:
            self.close()
        else:
            self.start, self.times = int(w["start"]), [float(t) for t in w["times"]]


class Schedule:
    """The due parts of a callback at each event (see the module docstring).

    Args:
        parts: part name → its triggers (a part is due when any of them is).
        cadence: the callback's cadence; its costs are recorded whether or not a part uses it.
        once_per_step: measure a step at most once (across events).
    """

    def __init__(
        self,
        parts: Mapping[str, Iterable[Trigger]],
        cadence: Cadence,
        *,
        once_per_step: bool = False,
    ) -> None:
        self.parts = {name: list(triggers) for name, triggers in parts.items()}
        self.cadence = cadence
        self.once_per_step = once_per_step
        self.measured_step = -1
        budgeted = [
            (name, t) for name, ts in self.parts.items() for t in ts if isinstance(t, Budgeted)
        ]
        if len(budgeted) > 1:
            raise ValueError("a schedule holds at most one budgeted trigger")
        self._budgeted = budgeted[0] if budgeted else None

    @property
    def uses_cadence(self) -> bool:
        """Whether a part follows the cadence (then its plan is announced and reported)."""
        return self._budgeted is not None

    def _local(self, event: Event, step: int, epoch: int) -> set[str]:
        return {
            name for name, ts in self.parts.items() if any(t.due(event, step, epoch) for t in ts)
        }

    def propose(
        self, event: Event, step: int, epoch: int, busy: float | None = None
    ) -> tuple[set[str], tuple[bool, int] | None]:
        """This rank's view: the parts due by rule, and a budget decision that needs rank 0's
        answer (``None``: no budget check at this event)."""
        due = self._local(event, step, epoch)
        ask = None
        if event == "step" and self._budgeted is not None:
            cadence = self._budgeted[1].cadence
            if cadence.budgeted and cadence.is_check(step):
                ask = cadence.decide(step, busy=busy)
        return due, ask

    def settle(self, step: int, due: set[str], answer: tuple[bool, int] | None) -> frozenset[str]:
        """The due parts once rank 0's ``answer`` to :meth:`propose`'s question is known."""
        if answer is not None and self._budgeted is not None:
            measure, nxt = answer
            self._budgeted[1].cadence.next_check = int(nxt)
            if measure:
                due.add(self._budgeted[0])
        if due and self.once_per_step:
            if step == self.measured_step:
                return frozenset()
            self.measured_step = step
        return frozenset(due)

    def local(self, event: Event, step: int, epoch: int = 0) -> frozenset[str]:
        """The due parts at an event that needs no budget decision (same on every rank)."""
        due, ask = self.propose(event, step, epoch)
        assert ask is None, "a budget decision needs decide()"
        return self.settle(step, due, None)

    def windows(self) -> Windows | None:
        found = [t for ts in self.parts.values() for t in ts if isinstance(t, Windows)]
        return found[0] if found else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.once_per_step:
            state["measured_step"] = self.measured_step
        w = self.windows()
        if w is not None:
            state.update(w.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.once_per_step:
            self.measured_step = int(state.get("measured_step", -1))
        w = self.windows()
        if w is not None:
            w.load_state_dict(state)


def decide(
    trainer: pl.Trainer, peers: Sequence[MeasurementCallback], event: Event, busy: float
) -> dict[int, frozenset[str]]:
    """The due parts of every callback in ``peers`` at this event (``id(cb)`` → parts).

    Taken once per step and event, before any callback measures; the budget decisions of all
    peers at a check step travel in one broadcast from rank 0 (no collective otherwise).
    """
    step, epoch = trainer.global_step, trainer.current_epoch
    proposals = [cb.timing.propose(event, step, epoch, busy=busy) for cb in peers]
    asks = [ask for _, ask in proposals if ask is not None]
    answers = iter(trainer.strategy.broadcast(asks, src=0) if asks else [])
    out: dict[int, frozenset[str]] = {}
    for cb, (due, ask) in zip(peers, proposals):
        answer = None if ask is None else next(answers)
        out[id(cb)] = cb.timing.settle(step, due, answer)
        if ask is not None:
            reporting.check_plan(cb)
    return out


def account(cb: MeasurementCallback, trainer: pl.Trainer, cost: float, *, empty: bool) -> None:
    """Charge a measurement of ``cost`` seconds to ``cb``'s cadence (on every rank).

    An ``empty`` one (nothing could be measured yet, e.g. no optimizer state) is not a point of
    the plan: look again soon, backing off (1, 2, 4, … steps) while it stays so. Otherwise the
    cost is recorded and, for a planned budget, rank 0 re-plans and every rank follows.
    """
    cadence = cb.cadence
    if empty:
        cb._empty_streak += 1
        cadence.next_check = trainer.global_step + 2 ** min(cb._empty_streak - 1, 10)
        return
    cb._empty_streak = 0
    cadence.record(cost)
    if cadence.planned:
        nxt = cadence.replan(trainer.global_step)
        cadence.next_check = int(trainer.strategy.broadcast(nxt, src=0))
    reporting.check_plan(cb)
