"""Validation of K-FAC hyperparameters that may be schedules (callables of the step).

Shared by :class:`~lightning_landscape.optim.kfac.KFACPreconditioner` and the Lightning callback,
so both reject the same bad arguments with a ``ValueError`` naming the argument and the value
(plain arguments are checked with :mod:`lightning_landscape.checks`).
A schedule is any callable ``step -> float``; its value is checked when it is evaluated.

Example::

    >>> h = Hyper("damping", 1e-3, low=0.0)
    >>> h(10)
    0.001
    >>> Hyper("damping", lambda step: 1e-2 / (1 + step), low=0.0)(9)
    0.001
    >>> Hyper("damping", -1.0, low=0.0)
    Traceback (most recent call last):
    ...
    ValueError: `damping` must be a number > 0 or a callable of the step, got -1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_landscape.checks import is_number

__all__ = ["Hyper"]

Schedule = float | Callable[[int], float]


class Hyper:
    """A hyperparameter that is a number or a callable of the step, in an interval.

    Args:
        name: Argument name used in error messages.
        value: A number, or a callable ``step -> number`` (checked whenever it is called).
        low: Lower bound.
        high: Upper bound (default: none).
        closed_low: Whether ``low`` itself is allowed (``low <= v``) or not (``low < v``).
        closed_high: Whether ``high`` itself is allowed.

    Raises:
        ValueError: If a number lies outside the interval, is not finite, or ``value`` is
            neither a number nor callable.
    """

    def __init__(
        self,
        name: str,
        value: Any,
        *,
        low: float,
        high: float = math.inf,
        closed_low: bool = False,
        closed_high: bool = False,
    ) -> None:
        self.name = name
        self.low, self.high = low, high
        self.closed_low, self.closed_high = closed_low, closed_high
        if not callable(value) and not is_number(value):
            raise ValueError(
                f"`{name}` must be {self._interval()} or a callable of the step, got {value!r}"
            )
        self.value = value
        if not callable(value):
            self._check(float(value), value, None)

    def _interval(self) -> str:
        lo = ">=" if self.closed_low else ">"
        if math.isinf(self.high):
            return f"a number {lo} {self.low:g}"
        lb = "[" if self.closed_low else "("
        hb = "]" if self.closed_high else ")"
        return f"a number in {lb}{self.low:g}, {self.high:g}{hb}"

    def _check(self, v: float, raw: Any, step: int | None) -> float:
        ok_low = v >= self.low if self.closed_low else v > self.low
        ok_high = v <= self.high if self.closed_high else v < self.high
        if not (math.isfinite(v) and ok_low and ok_high):
            where = "" if step is None else f" (the schedule's value at step {step})"
            raise ValueError(
                f"`{self.name}` must be {self._interval()} or a callable of the step, "
                f"got {raw!r}{where}"
            )
        return v

    @property
    def is_schedule(self) -> bool:
        return callable(self.value)

    def __call__(self, step: int) -> float:
        """The value at ``step`` (validated)."""
        if not callable(self.value):
            return float(self.value)
        raw = self.value(step)
        if not is_number(raw) and not hasattr(raw, "__float__"):
            raise ValueError(
                f"`{self.name}` schedule must return a number, got {raw!r} at step {step}"
            )
        return self._check(float(raw), raw, step)
