"""The vector field of the gradient flow: ``F(θ) = −P⁻¹(∇L + c ⊙ θ) − d ⊙ θ`` (:class:`Flow`).

See :mod:`~.gradient_flow` for the measurements built on it. ``J = ∂F/∂θ = −P⁻¹(H + C) − D``
is similar to the symmetric ``−(P^-1/2(H + C)P^-1/2 + D)``, so the eigenvalues of ``−J`` lie
in ``[λ_min + min(P⁻¹c + d), λ_max + max(P⁻¹c + d)]`` with ``λ`` those of
``P^-1/2 H P^-1/2`` (Weyl): :meth:`Flow.rate_min` and :meth:`Flow.rate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Flow", "FlowOperator"]


class FlowOperator(Protocol):
    """What the flow needs from an operator (:class:`~.operators.ProbeHessian` has it)."""

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def vector(self) -> torch.Tensor: ...

    def set_vector(self, vector: torch.Tensor) -> None: ...


def _vector(name: str, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"`{name}` must be a flat tensor or None, got {value!r}")
    if bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class Flow:
    """The vector field ``F(θ) = −inverse ⊙ (∇L + coupled ⊙ θ) − decoupled ⊙ θ``.

    Attributes:
        inverse: ``P⁻¹`` as a flat vector in the operator's parameter order (``0`` for frozen
            entries); ``None``: ``P = I``.
        coupled: L2 weight decay added to the gradient, per entry (``None``: none).
        decoupled: weight decay applied outside the preconditioner, per entry (``None``: none).
    """

    inverse: torch.Tensor | None = None
    coupled: torch.Tensor | None = None
    decoupled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("inverse", "coupled", "decoupled"):
            _vector(name, getattr(self, name))

    @classmethod
    def preconditioned(
        cls,
        diagonal: torch.Tensor,
        *,
        coupled: torch.Tensor | None = None,
        decoupled: torch.Tensor | None = None,
    ) -> Flow:
        """The flow ``θ̇ = −P⁻¹∇L`` (plus decays) for a positive diagonal ``P`` (``+inf``: frozen)."""
        if not isinstance(diagonal, torch.Tensor) or diagonal.dim() != 1:
            raise ValueError(f"`diagonal` must be a flat tensor, got {diagonal!r}")
        if bool((diagonal <= 0).any()) or bool(torch.isnan(diagonal).any()):
            raise ValueError("`diagonal` must be positive (a diagonal preconditioner)")
        return cls(inverse=diagonal.reciprocal(), coupled=coupled, decoupled=decoupled)

    def check(self, size: int) -> None:
        """Raise ``ValueError`` unless every vector has ``size`` entries."""
        for name in ("inverse", "coupled", "decoupled"):
            t = getattr(self, name)
            if t is not None and t.numel() != size:
                raise ValueError(f"`{name}` must have {size} entries, got {t.numel()}")

    def _cast(self, t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.to(device=like.device, dtype=like.dtype)

    def velocity(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``F(θ)`` from ``θ`` and ``∇L(θ)``."""
        inverse, coupled, decoupled = (self._cast(t, grad) for t in self._vectors())
        u = grad if coupled is None else grad + coupled * theta.to(grad.dtype)
        out = -(u if inverse is None else inverse * u)
        return out if decoupled is None else out - decoupled * theta.to(grad.dtype)

    def jacobian_vector(self, hv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J v`` given ``H v`` (``J = −P⁻¹(H + C) − D``)."""
        return self.velocity(v, hv)  # F is affine in (θ, ∇L): J v = F(v, Hv)

    def _decay(self) -> torch.Tensor | None:
        """``P⁻¹c + d`` per entry: the decays' diagonal in ``P^-1/2(H + C)P^-1/2 + D ~ −J``."""
        out = None
        if self.coupled is not None:
            inv = torch.ones_like(self.coupled) if self.inverse is None else self.inverse
            out = inv.to(self.coupled) * self.coupled
        if self.decoupled is not None:
            out = self.decoupled if out is None else out + self.decoupled.to(out)
        return out

    def rate(self, lambda_max: float) -> float:
        """An upper bound of the eigenvalues of ``−J`` from ``λ_max(P^-1/2 H P^-1/2)``."""
        decay = self._decay()
        return max(float(lambda_max), 0.0) + (0.0 if decay is None else float(decay.max()))

    def rate_min(self, lambda_min: float) -> float:
        """A lower bound of the eigenvalues of ``−J`` from ``λ_min(P^-1/2 H P^-1/2)``."""
        decay = self._decay()
        return float(lambda_min) + (0.0 if decay is None else float(decay.min()))

    def _vectors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.inverse, self.coupled, self.decoupled)
