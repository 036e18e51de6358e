"""Planning a run's measurements: how many fit the budget, and at which steps.

The default cadence spends a share ``f`` (``max_overhead``) of the run's wall time on a
callback's measurements. When the run's length is known (``trainer.estimated_stepping_batches``)
the budget is planned over the whole run instead of being spent as it accrues:

- **how many**: with ``T`` steps of ``τ`` seconds, a first (cold) measurement of ``c₀`` and
  steady-state (warm-started) ones of ``c`` seconds, measurements may take
  ``f/(1−f)·T·τ`` seconds in all (then they are ``f`` of the total), so
  ``n = 1 + ⌊(f/(1−f)·T·τ − c₀)/c⌋`` points fit (:func:`affordable_points`);
- **where**: point 0 at the first step, then half of the rest geometrically spaced up to
  ``early_fraction·T`` (so sharpening from initialisation is seen) and the other half evenly
  over the remainder, the last at ``T`` (:func:`planned_steps`).

The plan is re-made at every measurement from the measured step time and costs, so an estimate
that was off early on is corrected; the budget is a total over the run (the early, dense part
runs above ``f`` for a while and the even part below it).

Example::

    >>> planned_steps(9, 1000)
    [0, 3, 6, 16, 40, 100, 325, 550, 775, 1000]
    >>> affordable_points(0.05, total_steps=1000, step_time=0.1, first_cost=1.0, warm_cost=0.2)
    22
"""

from __future__ import annotations

import math

__all__ = ["EARLY_FRACTION", "affordable_points", "budget_seconds", "planned_steps"]

#: Share of the run that holds the dense, geometrically spaced half of the points.
EARLY_FRACTION = 0.1


def budget_seconds(f: float, total_steps: int, step_time: float) -> float:
    """Seconds of measurement that make up a share ``f`` of a run of ``total_steps`` steps."""
    return f / (1.0 - f) * total_steps * step_time


def affordable_points(
    f: float, *, total_steps: int, step_time: float, first_cost: float, warm_cost: float
) -> int:
    """Measurements (including the first) that fit a share ``f`` of the run (at least 1)."""
    budget = budget_seconds(f, total_steps, step_time)
    if warm_cost <= 0.0:
        return total_steps + 1
    rest = budget - first_cost
    return max(1, 1 + math.floor(rest / warm_cost)) if rest > 0 else 1


def planned_steps(
    points: int, total_steps: int, *, start: int = 0, early_fraction: float = EARLY_FRACTION
) -> list[int]:
    """``points`` measurement steps after ``start`` (plus ``start`` itself), denser early.

    Half of the points (rounded up) are geometrically spaced in ``(start, start + early·L]``
    with ``L = total_steps − start``, the rest evenly spaced in ``(start + early·L, total]``.
    Steps are distinct; if fewer distinct steps exist than asked for, every step is returned.
    """
    length = total_steps - start
    if points <= 0 or length <= 0:
        return [start]
    if points >= length:
        return list(range(start, total_steps + 1))
    early_end = max(1.0, early_fraction * length)
    n_early = math.ceil(points / 2)
    n_late = points - n_early
    steps = {start}
    for j in range(1, n_early + 1):
        steps.add(start + max(1, round(early_end ** (j / n_early))))
    for i in range(1, n_late + 1):
        steps.add(start + round(early_end + (length - early_end) * i / n_late))
    out = sorted(s for s in steps if s <= total_steps)
    # collisions at the start (rounding) leave fewer points: fill the largest gaps
    while len(out) < points + 1:
        gaps = [(b - a, i) for i, (a, b) in enumerate(zip(out, out[1:])) if b - a > 1]
        if not gaps:
            break
        _, i = max(gaps)
        out.insert(i + 1, (out[i] + out[i + 1]) // 2)
    return out
