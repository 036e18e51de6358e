"""Argument checks shared by ``measures/`` and ``callbacks/`` (pure Python: no torch, no Lightning).

Every check raises a ``ValueError`` whose message names the argument and quotes the value,
``"`name` must be <what>, got <value!r>"``, and returns the value (as a ``float`` for numbers),
so a check can sit in an assignment. ``bool`` is never accepted as a number.

Example::

    >>> check_int("k", 3)
    3
    >>> check_int("window", -1, low=0)
    Traceback (most recent call last):
    ...
    ValueError: `window` must be an integer >= 0, got -1
    >>> check_number("rk4_c", 3.0, high=2.78, include_high=True)
    Traceback (most recent call last):
    ...
    ValueError: `rk4_c` must be a number in (0, 2.78], got 3.0
    >>> check_choice("bn", "train", ("eval", "batch"))
    Traceback (most recent call last):
    ...
    ValueError: `bn` must be 'eval' or 'batch', got 'train'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_steps",
    "check_strings",
    "check_tag",
    "check_regex",
    "check_that",
    "is_int",
    "is_number",
]

T = TypeVar("T")

_TAG = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (``bool`` is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_that(name: str, value: T, ok: bool, expected: str) -> T:
    """Raise ``"`name` must be <expected>, got <value!r>"`` unless ``ok``; return ``value``."""
    if not ok:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int = 1, *, none: bool = False) -> Any:
    """An ``int`` ≥ ``low`` (or ``None`` when ``none``)."""
    if none and value is None:
        return None
    what = "a positive integer" if low == 1 else f"an integer >= {low}"
    return check_that(
        name, value, is_int(value) and value >= low, what + (" or None" if none else "")
    )


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    include_low: bool = False,
    include_high: bool = False,
    finite: bool = True,
    none: bool = False,
) -> Any:
    """A number in the interval from ``low`` to ``high`` (open ends unless included), finite
    unless ``finite=False``; ``None`` passes when ``none``. Returns it as a ``float``.

    The message reads ``a positive number`` for ``(0, ∞)``, ``a number >= x`` for ``[x, ∞)``,
    ``a number in (a, b]`` otherwise.
    """
    if none and value is None:
        return None
    ok = is_number(value) and not math.isnan(value)
    if ok:
        x = float(value)
        ok = (x >= low if include_low else x > low) and (x <= high if include_high else x < high)
        ok = ok and (math.isfinite(x) or not finite)
    if high == math.inf and low == 0.0 and not include_low:
        what = "a positive number"
    elif high == math.inf:
        what = f"a number {'>=' if include_low else '>'} {_fmt(low)}"
    else:
        what = (
            f"a number in {'[' if include_low else '('}{_fmt(low)}, {_fmt(high)}"
            f"{']' if include_high else ')'}"
        )
    if finite and high == math.inf:
        what = what.replace("number", "finite number")
    check_that(name, value, ok, what + (" or None" if none else ""))
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """A ``bool`` (``0``/``1`` are not)."""
    return check_that(name, value, isinstance(value, bool), "a bool")


def check_choice(name: str, value: T, choices: Sequence[Any]) -> T:
    """One of ``choices`` (compared with ``in``)."""
    names = [repr(c) for c in choices]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set
        ok = False
    return check_that(name, value, ok, what)


def check_strings(
    name: str,
    value: Any,
    *,
    what: str,
    empty: bool = False,
    none: bool = False,
    item: Callable[[Any], bool] | None = None,
) -> Any:
    """A list (or tuple) of strings — not a single ``str`` — non-empty unless ``empty``;
    ``item`` replaces the per-entry test (``isinstance(entry, str)``). ``what`` is the message's
    description (``"a non-empty list of module names"``)."""
    if none and value is None:
        return None
    test = item if item is not None else (lambda entry: isinstance(entry, str))
    ok = (
        not isinstance(value, (str, bytes))
        and isinstance(value, Sequence | set | frozenset)
        and (empty or len(value) > 0)
        and all(test(entry) for entry in value)
    )
    return check_that(name, value, ok, what + (" or None" if none else ""))


def check_tag(name: str, value: Any) -> Any:
    """``None`` or a tag segment: letters, digits, ``_ . -`` and inner ``/``."""
    ok = value is None or (isinstance(value, str) and _TAG.fullmatch(value) is not None)
    return check_that(
        name,
        value,
        ok,
        "None or a non-empty tag segment of letters, digits, '_', '.', '-' (and inner '/')",
    )


def check_steps(name: str, value: Any) -> list[int]:
    """A list of integers ≥ 0 (``None``: none), returned sorted and without repeats."""
    if value is None:
        return []
    what = "a list of integers >= 0 or None"
    ok = not isinstance(value, (str, bytes)) and isinstance(value, Sequence | set | frozenset)
    check_that(name, value, ok and all(is_int(s) and s >= 0 for s in value), what)
    return sorted(set(value))


def check_regex(name: str, value: Any) -> re.Pattern[str] | None:
    """``None`` or a regular expression string, returned compiled."""
    if value is None:
        return None
    check_that(name, value, isinstance(value, str), "a regular expression string or None")
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"`{name}` is not a valid regular expression: {value!r} ({err})") from err
