"""Gradient-flow deviation: how far a discrete optimizer strays from the flow it discretises.

The flow (arXiv:2107.06608; its integration as in arXiv:2103.00065) of the probe loss ``L``,
optionally diagonally preconditioned and with weight decay, is

.. math:: \\dot θ = F(θ) = -P^{-1}\\,(∇L(θ) + c ⊙ θ) - d ⊙ θ

with ``P`` a positive diagonal (``P = I`` for gradient descent; ``+inf`` entries are frozen),
``c`` an L2 (coupled) and ``d`` a decoupled weight decay, all held in a :class:`Flow`. A step
``θ + ηF(θ)`` of effective learning rate ``η`` is the Euler discretisation of that flow: plain
GD is ``θ − η∇L``, a diagonally preconditioned method is ``θ − ηP^{-1}∇L``.

**Step gap** (:func:`step_gap`, 1 gradient + 1 Hessian-vector product). Along the flow
``θ̈ = J θ̇`` with ``J = ∂F/∂θ = −P^{-1}(H + C) − D``, so
``θ_flow(η) = θ + ηF + ½η² JF + O(η³)``. The step misses the flow by ``½η²‖JF‖``; relative to
the step's length ``η‖F‖``

.. math:: \\text{step gap} = \\tfrac{η}{2}\\, ‖J F‖ / ‖F‖

which is ``(η/2)‖Hg‖/‖g‖`` for GD and ``(η/2)‖P^{-1}HP^{-1}g‖/‖P^{-1}g‖`` for the step
``θ − ηP^{-1}g`` against ``θ̇ = −P^{-1}∇L`` (norms are Euclidean in ``θ``, as for the
window below). On one eigendirection of ``P^{-1}H`` with ``z = ηλ`` the exact relative gap is
``|1 − z − e^{−z}|/z`` (0.57 at ``z = 2``, the edge of stability of GD); the step gap is its
small-``z`` limit ``z/2`` (``0 ≤ z/2 − exact ≤ z²/6``; for ``z ≫ 1`` the exact gap saturates at
1 while the first-order ``z/2`` keeps growing).

**Window deviation** (:func:`window_deviation`). From a snapshot ``θ_s`` integrate the flow for
time ``T`` (the sum of the effective learning rates of the ``k`` steps taken since) with
classical RK4, in ``n = ceil(T·rate/c)`` equal sub-steps (``rate`` bounds the largest
eigenvalue of ``−J``, i.e. λ_max of ``P^{-1/2}HP^{-1/2}`` plus the decays; RK4 is stable for
``h·rate ≤ 2.78`` and its error per unit time is ``O((h·rate)^4)``), and compare with the
optimizer's ``θ_{s+k}``:

.. math:: D = ‖θ_{s+k} − θ_{flow}‖ / ‖θ_{flow} − θ_s‖

Cost: ``4n`` probe gradients (four RK4 stages per sub-step), ``n ≈ kz/c`` with ``z = ηλ``
(about ``2k/c`` at the edge of stability). On one eigendirection with ``k = 1``
``D = |1 − z − e^{−z}|/(1 − e^{−z})``; normalised by the optimizer's own displacement
(``relative_to_steps``) it is ``|1 − z − e^{−z}|/z``. The comparison is exact for full-batch GD
on the probe; with mini-batches ``θ_{s+k}`` also carries the gradient noise of the batches,
which ``D`` then contains too.

Example::

    >>> import torch
    >>> from lightning_landscape.measures.probe import Probe
    >>> from lightning_landscape.measures.operators import ProbeHessian
    >>> net = torch.nn.Linear(1, 1, bias=False).double()
    >>> _ = torch.nn.init.ones_(net.weight)
    >>> probe = Probe.from_samples((torch.full((4, 1), 2.0, dtype=torch.float64),))
    >>> op = ProbeHessian(net, probe, lambda m, b: 0.5 * (m(b[0]) ** 2).mean())  # λ = 4
    >>> round(step_gap(op, 0.25).value, 12)  # z = ηλ = 1: z / 2
    0.5
    >>> gd = op.vector() - 0.25 * op.loss_and_gradient()[1]  # one GD step: lands on 0
    >>> w = window_deviation(op, start=op.vector(), end=gd, time=0.25, rate=4.0, c=0.05)
    >>> round(w.relative_to_steps, 6)  # |1 − z − e^{−z}|/z at z = 1: e^{−1}
    0.367879
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .operators import NonFiniteError

__all__ = [
    "Flow",
    "FlowOperator",
    "FlowPath",
    "StepGap",
    "WindowDeviation",
    "deviation",
    "integrate_flow",
    "step_gap",
    "window_deviation",
]

#: RK4's stability interval on the negative real axis is ``h·λ ≤ 2.785``.
RK4_STABILITY = 2.78


class FlowOperator(Protocol):
    """What the flow needs from an operator (:class:`~.operators.ProbeHessian` has it)."""

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def vector(self) -> torch.Tensor: ...

    def set_vector(self, vector: torch.Tensor) -> None: ...


def _number(name: str, value: object, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"`{name}` must be {kind} finite number, got {value!r}")
    return number


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

    def rate(self, lambda_max: float) -> float:
        """An upper bound of the eigenvalues of ``−J`` from ``λ_max(P^-1/2 H P^-1/2)``."""
        extra = 0.0
        if self.coupled is not None:
            inv = torch.ones_like(self.coupled) if self.inverse is None else self.inverse
            extra += float((inv.to(self.coupled) * self.coupled).max())
        if self.decoupled is not None:
            extra += float(self.decoupled.max())
        return max(float(lambda_max), 0.0) + extra

    def _vectors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.inverse, self.coupled, self.decoupled)


@dataclass(frozen=True)
class StepGap:
    """Result of :func:`step_gap`.

    Attributes:
        value: ``(η/2)‖JF‖/‖F‖`` (0 where the velocity vanishes).
        lr: the effective learning rate ``η`` used.
        loss: the probe loss at ``θ``.
        speed: ``‖F(θ)‖``.
        gradients: probe gradients spent (1).
        hvps: Hessian-vector products spent (1, or 0 when ``F = 0``).
    """

    value: float
    lr: float
    loss: float
    speed: float
    gradients: int
    hvps: int


def step_gap(operator: FlowOperator, lr: float, *, flow: Flow | None = None) -> StepGap:
    """First-order relative gap between one optimizer step and the flow over the same time.

    Args:
        operator: the probe Hessian operator at the current parameters.
        lr: the step's effective learning rate ``η > 0`` (see the module docstring).
        flow: the preconditioner and decays (default: plain gradient flow).
    """
    eta = _number("lr", lr, positive=True)
    flow = flow or Flow()
    loss, grad = operator.loss_and_gradient()
    flow.check(grad.numel())
    velocity = flow.velocity(operator.vector(), grad)
    speed = float(velocity.norm())
    if speed == 0.0:
        return StepGap(0.0, eta, loss, 0.0, gradients=1, hvps=0)
    jf = flow.jacobian_vector(operator.matvec(velocity), velocity)
    value = 0.5 * eta * float(jf.norm()) / speed
    if not math.isfinite(value):
        raise NonFiniteError("non-finite step gap")
    return StepGap(value, eta, loss, speed, gradients=1, hvps=1)


@dataclass(frozen=True)
class FlowPath:
    """Result of :func:`integrate_flow`.

    Attributes:
        end: ``θ_flow(T)`` as a flat float64 vector.
        time: the integration time ``T``.
        substeps: RK4 sub-steps ``n``.
        step_size: ``h = T / n``.
        gradients: probe gradients spent (``4n``).
    """

    end: torch.Tensor
    time: float
    substeps: int
    step_size: float
    gradients: int


def substeps_for(time: float, rate: float, c: float) -> int:
    """``n = max(1, ceil(time·rate/c))``: the sub-steps keeping ``h·rate ≤ c``."""
    return max(1, math.ceil(time * max(rate, 0.0) / c - 1e-12))


def integrate_flow(
    operator: FlowOperator,
    *,
    time: float,
    rate: float,
    c: float = 1.0,
    flow: Flow | None = None,
    start: torch.Tensor | None = None,
    max_substeps: int = 100_000,
) -> FlowPath:
    """Integrate ``θ̇ = F(θ)`` from ``start`` for ``time`` with RK4, sub-step ``h ≤ c/rate``.

    The state is kept in float64; the operator's parameters are set to each stage's point and
    restored on exit (run it inside :func:`~.guard.guard` all the same).

    Args:
        operator: the probe Hessian operator (only its gradients are used).
        time: integration time ``T >= 0``.
        rate: the stiffness bound ``λ`` (e.g. ``flow.rate(λ_max)``); non-positive: one step.
        c: sub-step bound ``h·rate ≤ c``, in ``(0, 2.78]`` (RK4's stability limit).
        flow: the preconditioner and decays (default: plain gradient flow).
        start: the initial point (default: the operator's current parameters).
        max_substeps: refuse to integrate with more sub-steps than this.

    Raises:
        NonFiniteError: a gradient or the end point is not finite (the flow blew up).
    """
    total = _number("time", time)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"`rate` must be a finite number, got {rate!r}")
    step_bound = _number("c", c, positive=True)
    if step_bound > RK4_STABILITY:
        raise ValueError(f"`c` must be in (0, {RK4_STABILITY}] (RK4 stability), got {c!r}")
    if isinstance(max_substeps, bool) or not isinstance(max_substeps, int) or max_substeps < 1:
        raise ValueError(f"`max_substeps` must be a positive integer, got {max_substeps!r}")
    flow = flow or Flow()
    n = substeps_for(total, float(rate), step_bound)
    if n > max_substeps:
        raise ValueError(
            f"integrating for time {total:g} at rate {rate:g} needs {n} RK4 sub-steps, more "
            f"than `max_substeps`={max_substeps}"
        )
    original = operator.vector()
    theta = (original if start is None else start).detach().to(torch.float64).clone()
    flow.check(theta.numel())
    h = total / n
    gradients = 0

    def field(point: torch.Tensor) -> torch.Tensor:
        nonlocal gradients
        operator.set_vector(point.to(original.dtype))
        gradients += 1
        return flow.velocity(point, operator.loss_and_gradient()[1].to(torch.float64))

    try:
        if total > 0.0:
            for _ in range(n):
                k1 = field(theta)
                k2 = field(theta + (0.5 * h) * k1)
                k3 = field(theta + (0.5 * h) * k2)
                k4 = field(theta + h * k3)
                theta = theta + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    finally:
        operator.set_vector(original)
    if not bool(torch.isfinite(theta).all()):
        raise NonFiniteError("the gradient flow left the finite numbers")
    return FlowPath(theta, total, n if total > 0.0 else 0, h, gradients)


def deviation(
    start: torch.Tensor, end: torch.Tensor, flow_end: torch.Tensor
) -> tuple[float, float]:
    """``(‖end − flow_end‖/‖flow_end − start‖, ‖end − flow_end‖/‖end − start‖)`` in float64.

    A zero denominator gives ``inf`` (or ``0`` when the numerator is zero too).
    """
    a, b, f = (t.detach().to(torch.float64).reshape(-1) for t in (start, end, flow_end))
    if not (a.shape == b.shape == f.shape):
        raise ValueError(
            f"`start`, `end` and `flow_end` must have the same size, got "
            f"{a.numel()}, {b.numel()}, {f.numel()}"
        )
    miss = float((b - f).norm())

    def ratio(den: float) -> float:
        return miss / den if den > 0.0 else (0.0 if miss == 0.0 else math.inf)

    return ratio(float((f - a).norm())), ratio(float((b - a).norm()))


@dataclass(frozen=True)
class WindowDeviation:
    """Result of :func:`window_deviation`.

    Attributes:
        deviation: ``D = ‖θ_{s+k} − θ_flow‖ / ‖θ_flow − θ_s‖``.
        relative_to_steps: ``‖θ_{s+k} − θ_flow‖ / ‖θ_{s+k} − θ_s‖``.
        path: the integrated flow (end point, sub-steps, gradients spent).
    """

    deviation: float
    relative_to_steps: float
    path: FlowPath

    @property
    def gradients(self) -> int:
        return self.path.gradients


def window_deviation(
    operator: FlowOperator,
    *,
    start: torch.Tensor,
    end: torch.Tensor,
    time: float,
    rate: float,
    c: float = 1.0,
    flow: Flow | None = None,
    max_substeps: int = 100_000,
) -> WindowDeviation:
    """Integrate the flow from ``start`` for ``time`` and compare its end with ``end``.

    Args:
        operator: the probe Hessian operator (its parameters are restored afterwards).
        start: ``θ_s``, the snapshot (flat, in the operator's parameter order).
        end: ``θ_{s+k}``, where the optimizer got to.
        time: the sum of the effective learning rates of the ``k`` steps.
        rate, c, flow, max_substeps: as in :func:`integrate_flow`.
    """
    path = integrate_flow(
        operator, time=time, rate=rate, c=c, flow=flow, start=start, max_substeps=max_substeps
    )
    d, rel = deviation(start, end, path.end)
    return WindowDeviation(d, rel, path)
