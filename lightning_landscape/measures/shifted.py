"""Curvature shifted by a diagonal: ``v ↦ H v + D v``, the operator coupled weight decay governs.

An optimizer that adds an L2 weight decay ``wd`` to the gradient (``torch.optim.SGD``,
``torch.optim.Adam`` with ``decoupled_weight_decay=False``, RSG, ARSG) follows ``∇L + D θ``,
whose Jacobian is ``H + D`` with ``D`` the diagonal of per-parameter decays (one value per
param group; NovoGrad, whose decay joins the normalised gradient, has ``D = d·P``). Its stability is decided by ``λ_max(P^-1/2 (H + D) P^-1/2)``, which for a
diagonal ``P`` is ``λ_max(P^-1/2 H P^-1/2 + D P^-1)`` — not by the loss's own sharpness
(:attr:`lightning_landscape.optim.stability.Stability.coupled_decay` gives ``D``).

- :class:`ShiftedOperator` — ``H + D`` for any :class:`CurvatureOperator` (free: one product
  of ``H`` per product).
- :func:`decay_vector` — the flat ``D`` of a per-parameter list, ``None`` when it is zero.
- :func:`constant_shift` — ``c`` when ``D = c·I`` (then ``λ_max(H + D) = λ_max(H) + c`` with
  no extra solve).
- :func:`shifted_preconditioned` — ``P^-1/2 (H + D) P^-1/2`` for a diagonal ``P`` (flat
  vector) or ``S (H + D) S`` for ``S = P^-1/2`` given as a map (K-FAC-like).

Example::

    >>> import torch
    >>> from lightning_landscape.measures._compat import LambdaOperator
    >>> H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> op = LambdaOperator(lambda v: H @ v, size=2, dtype=torch.float64)
    >>> d = torch.tensor([0.5, 1.5], dtype=torch.float64)
    >>> ShiftedOperator(op, d).matvec(torch.ones(2, dtype=torch.float64)).tolist()
    [3.5, 4.5]
    >>> constant_shift(torch.full((3,), 0.25)), constant_shift(d)
    (0.25, None)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._compat import CurvatureOperator
from .preconditioned import MatrixPreconditionedOperator, PreconditionedOperator, WrappedOperator

__all__ = ["ShiftedOperator", "constant_shift", "decay_vector", "shifted_preconditioned"]


def _check_diagonal(name: str, diagonal: object, size: int) -> torch.Tensor:
    if not isinstance(diagonal, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor, got {diagonal!r}")
    if diagonal.shape != (size,):
        raise ValueError(f"`{name}` must have shape ({size},), got {tuple(diagonal.shape)}")
    if not bool(torch.isfinite(diagonal).all()):
        raise ValueError(f"`{name}` must be finite, got non-finite entries in {diagonal!r}")
    return diagonal


class ShiftedOperator(WrappedOperator):
    """``v ↦ H v + D ⊙ v`` for a curvature operator ``H`` and a finite diagonal ``D``.

    Symmetric when ``H`` is, so Lanczos applies; its eigenvalues are those of ``H`` shifted by
    ``c`` when ``D = c·I``, and lie in ``[λ_i(H) + min D, λ_i(H) + max D]`` in general.

    Args:
        operator: the operator ``H``.
        diagonal: ``D`` as a flat vector in the operator's parameter order.

    Raises:
        ValueError: If ``diagonal`` is not a finite tensor of shape ``(operator.size,)``.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: torch.Tensor) -> None:
        _check_diagonal("diagonal", diagonal, operator.size)
        self.operator = operator
        self.diagonal = diagonal.to(device=operator.device, dtype=operator.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.operator.matvec(v) + self.diagonal * v


def decay_vector(
    decay: Sequence[torch.Tensor] | None, operator: CurvatureOperator
) -> torch.Tensor | None:
    """The flat ``D`` of per-parameter decays (``None`` or all zero: ``None``).

    Args:
        decay: one tensor per parameter of the operator (broadcast views are fine), or ``None``.
        operator: the operator whose size, dtype and device the vector takes.

    Raises:
        ValueError: If the sizes do not add up to ``operator.size`` or an entry is not finite.
    """
    if decay is None:
        return None
    if len(decay) == 0:
        raise ValueError("`decay` must hold one tensor per parameter, got an empty list")
    flat = torch.cat([d.reshape(-1) for d in decay]).to(
        device=operator.device, dtype=operator.dtype
    )
    _check_diagonal("decay", flat, operator.size)
    return None if not bool(flat.any()) else flat


def constant_shift(diagonal: torch.Tensor) -> float | None:
    """``c`` if every entry of the flat ``diagonal`` equals ``c`` (``D = c·I``), else ``None``."""
    if diagonal.numel() == 0:
        return 0.0
    first = diagonal[0]
    return float(first) if bool((diagonal == first).all()) else None


def shifted_preconditioned(
    operator: CurvatureOperator,
    decay: torch.Tensor | None,
    preconditioner: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
) -> PreconditionedOperator | MatrixPreconditionedOperator:
    """``P^-1/2 (H + D) P^-1/2``: ``D`` enters *before* the preconditioner.

    For a diagonal ``P`` this is ``P^-1/2 H P^-1/2 + D P^-1`` (``P = +inf`` rows are zero).

    Args:
        operator: the operator ``H``.
        decay: the flat ``D`` (``None``: no shift, the plain preconditioned operator).
        preconditioner: ``P`` as a flat positive vector, or ``v ↦ P^-1/2 v`` on flat vectors.
    """
    shifted = operator if decay is None else ShiftedOperator(operator, decay)
    if callable(preconditioner) and not isinstance(preconditioner, torch.Tensor):
        return MatrixPreconditionedOperator(shifted, preconditioner)
    return PreconditionedOperator(shifted, preconditioner)
