"""Hessian diagonal by Hutchinson's estimator and the per-layer ratio R_med.

``diag(H) = E[z ⊙ Hz]`` for Rademacher ``z`` (Bekas et al. 2007). R_med of a layer
(arXiv:2211.02254) is ``max_i |H_ii| / median_i |H_ii|`` over the layer's diagonal entries —
a cheap analogue of a condition number; Adam trajectories show smaller R_med than SGD.

Example::

    >>> import torch
    >>> from lightning_landscape.measures._compat import LambdaOperator
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
    >>> op = LambdaOperator(lambda v: A @ v, size=4, dtype=torch.float64)
    >>> hutchinson_diagonal(op, samples=1).tolist()   # exact for a diagonal matrix
    [1.0, 2.0, 3.0, 10.0]
    >>> round(rmed(torch.tensor([1.0, 2.0, 3.0, 10.0])), 3)  # median of 4 values = lower middle
    5.0
"""

from __future__ import annotations

import torch

from ._compat import CurvatureOperator

__all__ = ["hutchinson_diagonal", "rmed"]


def hutchinson_diagonal(
    operator: CurvatureOperator, *, samples: int = 20, seed: int = 0
) -> torch.Tensor:
    """Estimate ``diag(operator)`` as the mean of ``z ⊙ Az`` over ``samples`` Rademacher ``z``."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"`samples` must be a positive integer, got {samples!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(operator.size, dtype=operator.dtype, device=operator.device)
    for _ in range(samples):
        z = torch.randint(0, 2, (operator.size,), generator=gen).to(operator.device, operator.dtype)
        z = 2 * z - 1
        total += z * operator.matvec(z)
    return total / samples


def rmed(diagonal: torch.Tensor) -> float:
    """``max |d| / median |d|`` of one layer's diagonal (``torch.median``: lower middle)."""
    d = diagonal.detach().abs().reshape(-1)
    if d.numel() == 0:
        raise ValueError("`diagonal` is empty")
    med = float(d.median())
    return float("inf") if med == 0.0 else float(d.max()) / med
