"""When to measure: every N steps, on a schedule, or within a share of the wall time.

A time budget is the default because a fixed cadence is wrong for small and large models
alike: a λ_max on a 1024-sample probe costs a few training steps of a large model but tens of
steps of a small one. With ``max_overhead = f``:

- when the run's length is known (``total_steps``, from ``trainer.estimated_stepping_batches``)
  the budget is *planned* (:mod:`~lightning_landscape.callbacks.plan`): from the measured step
  time and the measured cost of a steady-state (warm-started) measurement — not the cold first
  one — it works out how many points fit ``f`` of the whole run and spreads them with the early
  part denser, re-planning at every measurement;
- otherwise the callback measures whenever its cumulative measurement time would stay at or
  below ``f`` of the wall time since training started (costs estimated the same way).

The budget decision depends on clocks, which differ between ranks; so decisions are only taken
at *check steps* agreed on by all ranks: at a check, rank 0's decision and its estimate of the
next check step are broadcast (one tiny collective per check, not per step). Between checks no
rank measures and no collective runs.

Example::

    >>> c = Cadence(every_n_steps=10)
    >>> [s for s in range(35) if c.is_check(s)]
    [0, 10, 20, 30]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from lightning_landscape.callbacks.plan import affordable_points, budget_seconds, planned_steps

__all__ = ["Cadence"]

#: A cold first measurement (no warm start, graphs and caches built) is taken to cost this many
#: steady-state ones until a steady-state one has been timed.
COLD_FACTOR = 2.0


class Cadence:
    """Decides at which optimizer steps a measurement runs.

    Exactly one mode is active: ``every_n_steps``, ``schedule`` (a callable ``step -> bool``),
    or the time budget ``max_overhead`` (the default).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float | None = 0.025,
        min_points: int = 16,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not isinstance(min_points, int) or isinstance(min_points, bool) or min_points < 1:
            raise ValueError(f"`min_points` must be a positive integer, got {min_points!r}")
        self.min_points = min_points
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be a positive integer or None, got {every_n_steps!r}"
            )
        if schedule is not None and not callable(schedule):
            raise ValueError(
                f"`schedule` must be a callable step -> bool or None, got {schedule!r}"
            )
        if every_n_steps is not None and schedule is not None:
            raise ValueError("give at most one of `every_n_steps` and `schedule`")
        if max_overhead is not None and (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, (int, float))
            or not 0.0 < max_overhead < 1.0
        ):
            raise ValueError(f"`max_overhead` must be a number in (0, 1), got {max_overhead!r}")
        if every_n_steps is None and schedule is None and max_overhead is None:
            raise ValueError("one of `every_n_steps`, `schedule` or `max_overhead` must be set")
        self.every_n_steps = every_n_steps
        self.schedule = schedule
        self.max_overhead = None if (every_n_steps or schedule) else max_overhead
        self.clock = clock
        # budget state since the last (re)start
        self.start_time: float | None = None
        self.start_step = 0
        self.spent = 0.0
        self.last_cost = 0.0
        self.last_end: float | None = None
        self.next_check = 0
        # the run's plan (checkpointed: a resumed run continues it)
        self.total_steps: int | None = None
        self.points = 0  # measurements so far in the run
        self.run_spent = 0.0  # their seconds
        self.first_cost = 0.0
        self.warm_costs: list[float] = []  # the latest steady-state costs
        self.planned_points: int | None = None  # the latest plan's total (None: no plan yet)
        self.step_time: float | None = None  # the latest estimate

    def warm_cost(self) -> float:
        """Estimated cost of a steady-state measurement (median of the latest warm ones)."""
        if self.warm_costs:
            return statistics.median(self.warm_costs)
        return self.first_cost / COLD_FACTOR if self.first_cost > 0 else self.last_cost

    @property
    def budgeted(self) -> bool:
        return self.max_overhead is not None

    @property
    def planned(self) -> bool:
        """Whether the budget is planned over a run of known length."""
        return self.budgeted and self.total_steps is not None

    def start(self, step: int, total_steps: int | None = None) -> None:
        """Training (re)starts at ``step`` of a run of ``total_steps`` (``None``: unknown)."""
        self.start_time = self.clock()
        self.start_step = step
        self.spent = 0.0
        self.last_end = None
        self.next_check = step
        self.total_steps = total_steps if total_steps and total_steps > step else None
        if step == 0:
            self.points, self.run_spent, self.first_cost = 0, 0.0, 0.0
            self.warm_costs, self.planned_points = [], None

    def is_check(self, step: int) -> bool:
        """Whether ``step`` is a step at which a decision is taken (identical on all ranks)."""
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if self.schedule is not None:
            return bool(self.schedule(step))
        return step >= self.next_check

    def decide(self, step: int, busy: float | None = None) -> tuple[bool, int]:
        """At a check step: ``(measure now, next check step)``. Only rank 0's answer counts.

        Args:
            step: the current optimizer step.
            busy: wall time spent measuring since :meth:`start` by *all* measurement
                callbacks (to estimate the time of one training step); default: this one's.
        """
        if not self.budgeted:
            return True, step + 1
        assert self.max_overhead is not None
        if self.start_time is None:
            self.start(step)
        f = self.max_overhead
        now = self.clock()
        elapsed = now - (self.start_time or 0.0)
        steps_done = step - self.start_step
        busy = self.spent if busy is None else max(busy, self.spent)
        if steps_done > 0:
            self.step_time = max(elapsed - busy, 1e-9) / steps_done
        if self.planned:
            return self._decide_planned(step)
        cost = self.warm_cost()
        # measure now iff the share stays <= f once this measurement (≈ its cost) is done ...
        wait = (self.spent + cost) / f - cost - elapsed
        # ... and the last one is at least cost·(1−f)/f in the past: credit left over from an
        # expensive first measurement must not be spent in a burst of back-to-back measurements
        if self.last_end is not None:
            wait = max(wait, cost * (1.0 - f) / f - (now - self.last_end))
        if wait <= 0.0 or cost == 0.0:
            return True, step + 1
        step_time = self.step_time if self.step_time is not None else 1e-9
        return False, step + max(1, math.ceil(wait / step_time))

    def plan(self) -> list[int]:
        """The steps of the current plan (the whole run's, from step 0)."""
        assert self.total_steps is not None
        points = self.planned_points if self.planned_points is not None else 1
        return planned_steps(points - 1, self.total_steps)

    def _left(self) -> int:
        """Further measurements the rest of the budget pays for (planned mode)."""
        assert self.max_overhead is not None and self.total_steps is not None
        assert self.step_time is not None
        budget = budget_seconds(self.max_overhead, self.total_steps, self.step_time)
        warm = self.warm_cost()
        left = math.floor((budget - self.run_spent) / warm) if warm > 0 else self.total_steps
        return max(left, 0)

    def _decide_planned(self, step: int) -> tuple[bool, int]:
        if self.step_time is None or self.points == 0:
            return True, step + 1
        left = self._left()
        self.planned_points = self.points + left
        later = [s for s in self.plan() if s > step]
        assert self.total_steps is not None
        return left >= 1, later[0] if later else self.total_steps + 1

    def replan(self, step: int) -> int:
        """After a measurement at ``step``: the next check, from the updated costs.

        Only rank 0's answer counts (the caller broadcasts it). Before a step time is known
        (after the first measurement) the next point is the first step of a plan of
        ``min_points``, so the steady-state cost is learnt early.
        """
        assert self.total_steps is not None
        if self.step_time is None:
            return self.first_check()
        left = self._left()
        self.planned_points = self.points + left
        later = [s for s in self.plan() if s > step]
        if left >= 1 and len(later) < left:
            # more budget than the plan has steps left (the costs came out lower than first
            # estimated, so early plan steps were passed): spread what is left evenly
            return step + max(1, (self.total_steps - step) // left)
        return later[0] if later else self.total_steps + 1

    def expected_points(self) -> int | None:
        """Points the current plan gives the whole run (``None`` before a plan exists)."""
        if not self.planned or self.step_time is None or self.points == 0:
            return None
        assert self.max_overhead is not None and self.total_steps is not None
        return affordable_points(
            self.max_overhead,
            total_steps=self.total_steps,
            step_time=self.step_time,
            first_cost=self.first_cost,
            warm_cost=self.warm_cost(),
        )

    def first_check(self) -> int:
        """Where the second point goes after the first (before any cost or step time is known):
        the first step of a plan of ``min_points``, so the warm cost is learnt early."""
        if not self.planned:
            return self.start_step + 1
        assert self.total_steps is not None
        return planned_steps(max(self.min_points - 1, 1), self.total_steps)[1]

    def record(self, seconds: float) -> None:
        """A measurement took ``seconds`` (called on every rank after measuring)."""
        self.spent += seconds
        self.run_spent += seconds
        self.last_cost = seconds
        self.last_end = self.clock()
        if self.points == 0:
            self.first_cost = seconds
        else:
            self.warm_costs = [*self.warm_costs[-4:], seconds]
        self.points += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "spent": self.spent,
            "last_cost": self.last_cost,
            "next_check": self.next_check,
            "points": self.points,
            "run_spent": self.run_spent,
            "first_cost": self.first_cost,
            "warm_costs": list(self.warm_costs),
            "planned_points": self.planned_points,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_cost = float(state.get("last_cost", 0.0))
        self.next_check = int(state.get("next_check", 0))
        self.points = int(state.get("points", 0))
        self.run_spent = float(state.get("run_spent", 0.0))
        self.first_cost = float(state.get("first_cost", 0.0))
        self.warm_costs = [float(c) for c in state.get("warm_costs", [])]
        planned = state.get("planned_points")
        self.planned_points = None if planned is None else int(planned)
