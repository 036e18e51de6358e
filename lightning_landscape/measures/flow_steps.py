"""How many RK4 sub-steps a gradient-flow window needs: the error-controlled step rule.

The window of :func:`~.gradient_flow.window_deviation` integrates ``θ̇ = F(θ)`` (Jacobian
``J``) for the time ``T`` that ``k`` optimizer steps of mean effective learning rate
``η = T/k`` covered, and reports how far the optimizer's end point is from the flow's. The
integration error must be small *relative to that deviation*, which for small steps is itself
small (``O(kη²λ²)``): a sub-step ``h = c/λ_max`` with a fixed ``c`` does not resolve it, and
ignores negative curvature, whose modes grow like ``e^{|λ|t}``.

**The rule** (:func:`window_substeps`). On one eigen-mode ``θ̇ = −λθ`` of ``−J`` (``λ < 0``:
a growing mode), after ``n`` sub-steps ``h = T/n``

- RK4 is off the flow by the factor ``|q(hλ)^n − 1|`` with ``q(x) = e^{x}R(−x)`` and
  ``R(x) = 1 + x + x²/2 + x³/6 + x⁴/24`` (``≈ Tλ(hλ)⁴/120``: :func:`rk4_relative_error`);
- gradient descent with steps ``η`` is off it by ``|((1 − z)e^{z})^k − 1| = 1 − e^{−k g(z)}``,
  ``z = ηλ``, ``g(z) = −ln(1 − z) − z`` (``≈ kz²/2``, the first-order deviation, saturating
  at 1), for ``z < 1``: :func:`gd_relative_deviation`. Modes with ``z ≥ 1`` (GD no longer
  follows them; their flow component is below ``e^{−k}``) count as saturated (``1``).

Both are relative to the mode's flow component, so their ratio does not depend on how much of
``θ`` lies along the mode; it grows with ``|λ|`` (like ``|λ|³`` unsaturated). ``n`` is the smallest
number of sub-steps for which it is at most ``rtol`` at both ends of the spectrum, ``λ_max``
(capped at ``1/η``) and ``λ_min`` when negative, and for which ``h·ρ ≤ c`` (``ρ`` the spectral
radius; ``c ≤ 2.78`` keeps RK4 stable). For gradient descent on a quadratic this bounds the
integration error along every eigendirection with ``ηλ < 1`` by ``rtol`` times GD's own
deviation along it, so the reported deviation is off by at most about ``rtol·(1 + D)``
relative; other optimizers (momentum, preconditioned, noisy batches) deviate more than GD with
the same steps, which only makes the target safer. Unsaturated, the rule reads
``(hρ)⁴ ≈ 60·rtol·ηρ``: ``n ≈ kz/(60·rtol·z)^{1/4}`` sub-steps, ``4n`` probe gradients.

The spectrum's lower end comes from :func:`lambda_min`, a warm-started Lanczos solve of
``σI − H`` (``σ ≈ λ_max``), which converges relative to ``λ_max − λ_min`` even when
``λ_min ≈ 0``.

Example::

    >>> window_substeps(1.0, 10, 1.0)              # z = 0.1, k = 10: h·λ ≈ 0.25
    4
    >>> window_substeps(1.0, 10, 1.0, -5.0)        # λ_min = −5 needs h·5 ≈ 0.36
    14
    >>> window_substeps(1.0, 10, 1.0, rtol=None)   # a fixed h·ρ ≤ c = 1
    1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_landscape.checks import check_int, check_number

from ._compat import CurvatureOperator, LambdaOperator
from .eigen import top_eigen

__all__ = [
    "RK4_STABILITY",
    "BottomEigen",
    "gd_relative_deviation",
    "lambda_min",
    "rk4_relative_error",
    "substeps_for",
    "window_substeps",
]

#: RK4's stability interval on the negative real axis is ``h·λ ≤ 2.785``.
RK4_STABILITY = 2.78
_MAX_SEARCH = 2**40


def substeps_for(time: float, rate: float, c: float) -> int:
    """``n = max(1, ceil(time·rate/c))``: the sub-steps keeping ``h·rate ≤ c``."""
    return max(1, math.ceil(time * max(rate, 0.0) / c - 1e-12))


def _rk4_excess(x: float) -> float:
    """``q(x) − 1 = e^{x}R(−x) − 1``, by its series ``−e^{x}Σ_{j≥5}(−x)^j/j!`` for small ``x``."""
    if abs(x) >= 0.5:
        y = -x
        return math.exp(x) * (1 + y + y * y / 2 + y**3 / 6 + y**4 / 24) - 1.0
    term, tail = (-x) ** 5 / 120.0, 0.0
    for j in range(6, 40):
        tail += term
        term *= -x / j
        if abs(term) <= 1e-17 * abs(tail):
            break
    return -math.exp(x) * tail


def rk4_relative_error(substeps: int, time: float, lam: float) -> float:
    """``|q(hλ)^n − 1|``: RK4's error on the mode ``θ̇ = −λθ`` relative to the exact mode."""
    if substeps < 1 or time == 0.0 or lam == 0.0:
        return 0.0
    excess = _rk4_excess(time * lam / substeps)
    return abs(math.expm1(substeps * math.log1p(excess)))


def gd_relative_deviation(z: float, steps: int) -> float:
    """``|((1 − z)e^{z})^k − 1|`` for ``z = ηλ < 1`` (``1`` for ``z ≥ 1``): GD off the mode."""
    if z >= 1.0:
        return 1.0
    small = abs(z) < 1e-3  # the series of −ln(1 − z) − z, free of cancellation
    g = z * z * (0.5 + z * (1 / 3 + z * (0.25 + z / 5))) if small else -math.log1p(-z) - z
    return -math.expm1(-steps * g)


def window_substeps(
    time: float,
    steps: int,
    rate: float,
    rate_min: float = 0.0,
    *,
    rtol: float | None = 1e-3,
    c: float = 1.0,
) -> int:
    """RK4 sub-steps for a window of ``steps`` optimizer steps over ``time`` (module docstring).

    Args:
        time: the window's integration time ``T >= 0``.
        steps: its optimizer steps ``k`` (mean effective learning rate ``T/k``).
        rate: the largest eigenvalue of ``−J`` (``flow.rate(λ_max)``).
        rate_min: the smallest one (``flow.rate_min(λ_min)``; negative: growing modes).
        rtol: target integration error relative to the deviation (``None``: only ``h·ρ ≤ c``).
        c: the cap ``h·ρ ≤ c``, in ``(0, 2.78]``.
    """
    check_int("steps", steps)
    if rtol is not None:
        check_number("rtol", rtol)
    for name, value in (("time", time), ("rate", rate), ("rate_min", rate_min)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if not math.isfinite(value) or (name == "time" and value < 0):
            raise ValueError(f"`{name}` must be a finite number (time >= 0), got {value!r}")
    if not (check_number("c", c) <= RK4_STABILITY):
        raise ValueError(f"`c` must be in (0, {RK4_STABILITY}] (RK4 stability), got {c!r}")
    radius = max(float(rate), -float(rate_min), 0.0)
    n = substeps_for(time, radius, c)
    if rtol is None or time == 0.0 or radius == 0.0:
        return n
    eta = time / steps
    modes = ([min(rate, 1.0 / eta)] if rate > 0 else []) + ([rate_min] if rate_min < 0 else [])

    def ok(m: int) -> bool:
        return all(
            rk4_relative_error(m, time, lam) <= rtol * gd_relative_deviation(eta * lam, steps)
            for lam in modes
        )

    if ok(n):
        return n
    lo, hi = n, 2 * n
    while not ok(hi):
        if hi >= _MAX_SEARCH:
            return hi
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class BottomEigen:
    """Result of :func:`lambda_min`.

    Attributes:
        value: the smallest eigenvalue, lowered by the Ritz residual (a safe side for sizing
            RK4 sub-steps).
        vector: its Ritz vector (the next solve's warm start).
        residual: the relative residual of the shifted solve.
        matvecs: operator products spent.
        converged: whether the shifted solve reached ``tol``.
    """

    value: float
    vector: torch.Tensor
    residual: float
    matvecs: int
    converged: bool


def lambda_min(
    operator: CurvatureOperator,
    *,
    shift: float,
    warm_start: torch.Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-2,
    seed: int = 0,
) -> BottomEigen:
    """The smallest eigenvalue of a symmetric ``operator``: ``σ − λ_max(σI − H)``.

    ``σ = max(shift, 0)`` should be about ``λ_max`` (e.g. the solve that just computed it):
    the top eigenvalue ``σ − λ_min`` of ``σI − H`` is then at least ``λ_max − λ_min``, so the
    relative tolerance of Lanczos holds relative to the spectrum's width, even for
    ``λ_min ≈ 0`` where a relative tolerance on ``λ_min`` itself is never met.
    """
    sigma = max(float(shift), 0.0)
    shifted = LambdaOperator(
        lambda v: sigma * v - operator.matvec(v),
        size=operator.size,
        device=operator.device,
        dtype=operator.dtype,
    )
    est = top_eigen(shifted, k=1, max_iter=max_iter, tol=tol, warm_start=warm_start, seed=seed)
    top, res = est.lambda_max, float(est.residuals[0])
    value = sigma - top - abs(top) * min(res, 1.0)
    return BottomEigen(value, est.eigenvectors[0], res, est.matvecs, est.converged)
