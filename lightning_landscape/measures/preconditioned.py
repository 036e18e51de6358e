"""Preconditioned curvature operators: ``P^{-1/2} H P^{-1/2}`` for a preconditioner ``P``.

Their eigenvalues are those of ``P^{-1} H``, the curvature an adaptive or K-FAC-preconditioned
optimizer sees. Both wrap any :class:`CurvatureOperator` (usually a
:class:`~.operators.ProbeHessian`) and are re-exported by :mod:`.operators`.

Example::

    >>> import torch
    >>> from lightning_landscape.measures._compat import LambdaOperator
    >>> H = torch.diag(torch.tensor([4.0, 9.0], dtype=torch.float64))
    >>> op = LambdaOperator(lambda v: H @ v, size=2, dtype=torch.float64)
    >>> pre = PreconditionedOperator(op, torch.tensor([4.0, 9.0 / 4.0], dtype=torch.float64))
    >>> pre.matvec(torch.ones(2, dtype=torch.float64)).tolist()
    [1.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._compat import CurvatureOperator

__all__ = ["MatrixPreconditionedOperator", "PreconditionedOperator", "WrappedOperator"]


class WrappedOperator(CurvatureOperator):
    """An operator built on another: same size, device and dtype as ``self.operator``."""

    operator: CurvatureOperator

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype


class PreconditionedOperator(WrappedOperator):
    """``u ↦ P^{-1/2} H P^{-1/2} u`` for a positive diagonal preconditioner ``P``.

    Its eigenvalues are those of ``P^{-1} H`` (the operator is symmetric, so Lanczos applies).
    Entries of ``P`` equal to ``+inf`` (parameters the optimizer never moves) give zero rows.

    Args:
        operator: the Hessian operator ``H``.
        diagonal: ``P`` as a flat vector in the operator's parameter order.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (operator.size,):
            raise ValueError(
                f"`diagonal` must have shape ({operator.size},), got {tuple(diagonal.shape)}"
            )
        if bool((diagonal <= 0).any()) or bool(torch.isnan(diagonal).any()):
            raise ValueError("`diagonal` must be positive (a diagonal preconditioner)")
        self.operator = operator
        self.scale = diagonal.to(device=operator.device, dtype=operator.dtype).rsqrt()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * self.operator.matvec(self.scale * v)


class MatrixPreconditionedOperator(WrappedOperator):
    """``u ↦ S H S u`` with ``S = P^{-1/2}`` of a symmetric positive definite ``P`` (any matrix).

    The non-diagonal counterpart of :class:`PreconditionedOperator` (K-FAC's Kronecker blocks):
    its eigenvalues are those of ``P^{-1} H``. ``S`` comes as a function on flat vectors and
    must be linear and symmetric (not checked).

    Args:
        operator: the Hessian operator ``H``.
        inverse_sqrt: ``v ↦ P^{-1/2} v`` on flat vectors in the operator's parameter order.
    """

    def __init__(
        self, operator: CurvatureOperator, inverse_sqrt: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        if not callable(inverse_sqrt):
            raise ValueError(f"`inverse_sqrt` must be callable, got {inverse_sqrt!r}")
        self.operator = operator
        self.inverse_sqrt = inverse_sqrt

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        out = self.inverse_sqrt(v)
        if out.shape != v.shape:
            raise ValueError(
                f"`inverse_sqrt` must return a vector of shape {tuple(v.shape)}, "
                f"got {tuple(out.shape)}"
            )
        return out.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(self.operator.matvec(self._apply(v)))
