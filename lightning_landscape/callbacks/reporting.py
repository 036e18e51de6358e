"""What a measurement callback tells the user about its plan: at the start, when fewer points
than ``min_points`` fit, and at the end (also kept as ``plan_summary`` / ``run_summary``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from lightning_landscape.callbacks.base import MeasurementCallback

__all__ = ["announce_plan", "check_plan", "report_run"]


def report_run(cb: MeasurementCallback) -> None:
    """One info line at the end: what was measured and what it cost, the first (cold) point
    (with the probe capture and calibration) and the per-step dispatch counted separately."""
    c = cb.cadence
    steps = max(getattr(cb, "_last_step", 0) - c.start_step, 0)
    dispatch = c.per_step_cost * steps
    share = (cb.seconds + dispatch) / max(time.perf_counter() - (c.start_time or 0.0), 1e-9)
    cb.run_summary = {
        "points": c.points,
        "skipped": cb.skipped,
        "seconds": cb.seconds,
        "first_seconds": c.first_cost,
        "dispatch_seconds": dispatch,
        "share": share,
    }
    rank_zero_info(
        f"{cb._owner_name()}: measured {c.points} times ({cb.skipped} skipped) in "
        f"{cb.seconds:.1f} s (the first, cold, with the probe: {c.first_cost:.1f} s) and "
        f"~{dispatch:.1f} s of hook dispatch: {100 * share:.1f}% of the training wall time."
    )


def announce_plan(cb: MeasurementCallback, trainer: pl.Trainer) -> None:
    """One info line at the first measurement: probe, expected points, expected share."""
    c = cb.cadence
    size = cb.probe.num_samples * trainer.world_size if cb.probe is not None else 0
    cb.plan_summary = {
        "probe_size": size,
        "auto": cb.probe_size == "auto",
        "expected_points": c.expected_points(),
        "max_overhead": c.max_overhead,
        "total_steps": c.total_steps,
    }
    if c.every_n_steps is not None or c.schedule is not None:
        how = "on the steps you scheduled"
    elif c.planned:
        how = (
            f"on a plan over {c.total_steps} steps made from the measured costs (target "
            f"≥ {c.min_points} points)"
        )
    else:
        how = "as often as the budget allows (run length unknown)"
    f = c.max_overhead
    budget = f" at ≤{100 * f:g}% of the time" if f is not None else ""
    rank_zero_info(
        f"{cb._owner_name()}: probe of {size} samples"
        f"{' (auto)' if cb.probe_size == 'auto' else ''}, measuring {how}{budget}."
    )


def check_plan(cb: MeasurementCallback) -> None:
    """Warn once if fewer than ``min_points`` fit: when the steady-state cost is known
    (third point), or earlier when the plan already gives no further point."""
    c = cb.cadence
    if not c.planned or "_plan_checked" in cb._warned or c.planned_points is None:
        return
    if c.points < 3 and c.planned_points > c.points:
        return
    cb._warned.add("_plan_checked")
    points = c.expected_points()
    cb.plan_summary["expected_points"] = points
    if points is not None and points < c.min_points:
        assert c.max_overhead is not None
        cb.warn_once(
            f"{cb._owner_name()} will measure ~{points} time(s) in this run at "
            f"{100 * c.max_overhead:g}% of its time (fewer than min_points={c.min_points}); "
            "raise `max_overhead` or set `every_n_steps`"
            + (", or lower `probe_size`." if cb.probe_size != "auto" else ".")
        )
