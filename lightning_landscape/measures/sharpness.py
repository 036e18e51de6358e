"""Sharpness: λ_max of the Hessian, of the preconditioned Hessian, and ρ-sharpness.

- :func:`lambda_max` — the largest *algebraic* Hessian eigenvalue (warm-started Lanczos).
- :func:`preconditioned_lambda_max` — λ_max(P^{-1/2} H P^{-1/2}) for a diagonal preconditioner
  ``P`` (the quantity that equilibrates at the stability threshold for Adam-like methods,
  Cohen et al. 2022, arXiv:2207.14484), or for any ``P`` given by the map ``v ↦ P^{-1/2} v``
  (K-FAC).
- :func:`rho_sharpness` — ``max_{‖δ‖ ≤ ρ} L(θ+δ) − L(θ)`` (SAM, arXiv:2010.01412) by a few
  projected normalised-gradient ascent steps; ``adaptive=True`` measures the ball in the
  coordinates ``δ / T`` with ``T = |θ| + offset`` (ASAM, arXiv:2102.11600), which makes the
  value invariant to rescaling of consecutive ReLU layers when ``offset = 0``. A single ascent
  step mostly measures the gradient norm away from a minimum; several steps are needed.

Example::

    >>> import torch
    >>> from lightning_landscape.measures.probe import Probe
    >>> from lightning_landscape.measures.operators import ProbeHessian
    >>> net = torch.nn.Linear(2, 1, bias=False).double()
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> probe = Probe.from_samples((x, torch.zeros(2, 1, dtype=torch.float64)))
    >>> op = ProbeHessian(net, probe, lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).mean())
    >>> round(lambda_max(op, tol=1e-12).lambda_max, 8)   # H = diag(1, 4) / 2
    2.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .eigen import EigenEstimate, top_eigen
from .operators import (
    MatrixPreconditionedOperator,
    PreconditionedOperator,
    ProbeHessian,
)

__all__ = ["RhoSharpness", "lambda_max", "preconditioned_lambda_max", "rho_sharpness"]


def lambda_max(
    operator: ProbeHessian | PreconditionedOperator | MatrixPreconditionedOperator,
    *,
    warm_start: torch.Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenEstimate:
    """The largest algebraic eigenvalue of ``operator`` (k = 1 of :func:`top_eigen`).

    ``tol`` bounds the relative eigenvalue error (``ρ²/δ``, see :func:`top_eigen`), not the
    residual. ``warm_start``: :meth:`EigenEstimate.warm_start` of the previous solve (its top
    and next Ritz vectors start this one, with a fresh random direction of equal weight); pass
    a different ``seed`` at every measurement so the fresh direction differs. A single start
    vector sees one copy of a repeated eigenvalue: λ_max is right, its multiplicity is not
    visible (use :func:`top_eigen` with ``k`` ≥ 2 for that).
    """
    return top_eigen(operator, k=1, max_iter=max_iter, tol=tol, warm_start=warm_start, seed=seed)


def preconditioned_lambda_max(
    operator: ProbeHessian,
    diagonal: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    *,
    warm_start: torch.Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenEstimate:
    """λ_max(P^{-1/2} H P^{-1/2}) for the diagonal ``P`` given as a flat vector, or for the
    symmetric ``P`` whose ``v ↦ P^{-1/2} v`` (flat vectors) is given as a callable.

    Solved as :func:`lambda_max` (same stopping rule, warm start and repeated-eigenvalue
    caveat)."""
    pre: PreconditionedOperator | MatrixPreconditionedOperator
    if callable(diagonal) and not isinstance(diagonal, torch.Tensor):
        pre = MatrixPreconditionedOperator(operator, diagonal)
    else:
        pre = PreconditionedOperator(operator, diagonal)
    return lambda_max(pre, warm_start=warm_start, max_iter=max_iter, tol=tol, seed=seed)


@dataclass(frozen=True)
class RhoSharpness:
    """Result of :func:`rho_sharpness`.

    Attributes:
        value: ``L(θ + δ*) − L(θ)`` for the best perturbation found.
        loss: ``L(θ)``.
        gradients: probe gradients spent.
    """

    value: float
    loss: float
    gradients: int


def _project(u: torch.Tensor, rho: float) -> torch.Tensor:
    norm = float(u.norm())
    return u if norm <= rho else u * (rho / norm)


def rho_sharpness(
    operator: ProbeHessian,
    rho: float,
    *,
    steps: int = 5,
    adaptive: bool = False,
    offset: float = 0.01,
) -> RhoSharpness:
    """``max_{‖δ/T‖ ≤ ρ} L(θ + δ) − L(θ)`` by projected normalised-gradient ascent.

    Each step moves the scaled perturbation ``u = δ / T`` by ``ρ`` along the normalised
    gradient ``T ⊙ ∇L(θ + δ)`` and projects back onto the ball. ``T = 1`` unless
    ``adaptive`` (then ``T = |θ| + offset``). Costs ``steps`` probe gradients plus one loss.
    The parameters are modified in place: call it inside :func:`guard`, which restores them.

    Args:
        operator: the probe Hessian operator (used for its loss and gradients).
        rho: radius of the ball.
        steps: ascent steps (≥ 1).
        adaptive: scale the ball by ``|θ| + offset`` (ASAM).
        offset: the ``offset`` in ``T`` (``c`` in docs/theory/sharpness.md §Definitions).
    """
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or rho <= 0:
        raise ValueError(f"`rho` must be a positive number, got {rho!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}")
    if offset < 0:
        raise ValueError(f"`offset` must be >= 0, got {offset!r}")
    theta = operator.vector()
    scale = theta.abs() + offset if adaptive else torch.ones_like(theta)
    base, grad = operator.loss_and_gradient()
    u = torch.zeros_like(theta)
    best = 0.0
    spent = 1
    try:
        for step in range(steps):
            direction = scale * grad
            norm = float(direction.norm())
            if norm == 0.0:
                break
            u = _project(u + (rho / norm) * direction, rho)
            operator.set_vector(theta + scale * u)
            if step + 1 < steps:
                loss, grad = operator.loss_and_gradient()
                spent += 1
            else:
                loss = operator.loss()
            best = max(best, loss - base)
    finally:
        operator.set_vector(theta)
    return RhoSharpness(value=best, loss=base, gradients=spent)
