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
classical RK4 in ``n`` equal sub-steps, and compare with the optimizer's ``θ_{s+k}``:

.. math:: D = ‖θ_{s+k} − θ_{flow}‖ / ‖θ_{flow} − θ_s‖

``n`` is error-controlled (:func:`~.flow_steps.window_substeps`): the smallest for which
RK4's error on the extreme eigen-modes of ``−J`` (``λ_max``, and ``λ_min`` when the
curvature is negative: those modes grow) is at most ``rtol`` (1e-3) times the deviation of
``k`` gradient-descent steps of the window's mean step ``T/k`` along them, and ``h·ρ ≤ c``
(``ρ`` the spectral radius). Cost: ``4n`` probe gradients (four RK4 stages per sub-step);
``n ≈ kz/(60·rtol·z)^{1/4}`` for ``z = ηλ_max < 1`` without negative curvature (7 sub-steps
for ``k = 10`` at ``z = 0.2``, 33 at ``z = 1`` and ``z = 2``). On one eigendirection with
``k = 1`` ``D = |1 − z − e^{−z}|/(1 − e^{−z})``; normalised by the optimizer's own
displacement (``relative_to_steps``) it is ``|1 − z − e^{−z}|/z``. The comparison is exact for
full-batch GD on the probe; with mini-batches ``θ_{s+k}`` also carries the gradient noise of
the batches, which ``D`` then contains too.

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

import torch

from lightning_landscape.checks import check_number

from .flow_field import Flow, FlowOperator
from .flow_steps import RK4_STABILITY, substeps_for, window_substeps
from .operators import NonFiniteError

__all__ = [
    "Flow",
    "FlowOperator",
    "FlowPath",
    "RK4_STABILITY",
    "StepGap",
    "WindowDeviation",
    "deviation",
    "integrate_flow",
    "step_gap",
    "substeps_for",
    "window_deviation",
    "window_substeps",
]


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
    eta = check_number("lr", lr)
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


def integrate_flow(
    operator: FlowOperator,
    *,
    time: float,
    rate: float | None = None,
    c: float = 1.0,
    flow: Flow | None = None,
    start: torch.Tensor | None = None,
    max_substeps: int = 100_000,
    substeps: int | None = None,
) -> FlowPath:
    """Integrate ``θ̇ = F(θ)`` from ``start`` for ``time`` with RK4 in equal sub-steps.

    The state is kept in float64; the operator's parameters are set to each stage's point and
    restored on exit (run it inside :func:`~.guard.guard` all the same).

    Args:
        operator: the probe Hessian operator (only its gradients are used).
        time: integration time ``T >= 0``.
        rate: the stiffness bound ``ρ`` (spectral radius of ``J``); sub-steps ``h ≤ c/ρ``;
            non-positive: one step. Not needed when ``substeps`` is given.
        c: sub-step bound ``h·rate ≤ c``, in ``(0, 2.78]`` (RK4's stability limit).
        flow: the preconditioner and decays (default: plain gradient flow).
        start: the initial point (default: the operator's current parameters).
        max_substeps: refuse to integrate with more sub-steps than this.
        substeps: the number of sub-steps ``n`` (e.g. from :func:`window_substeps`).

    Raises:
        NonFiniteError: a gradient or the end point is not finite (the flow blew up).
    """
    total = check_number("time", time, include_low=True)
    step_bound = check_number("c", c)
    if step_bound > RK4_STABILITY:
        raise ValueError(f"`c` must be in (0, {RK4_STABILITY}] (RK4 stability), got {c!r}")
    if isinstance(max_substeps, bool) or not isinstance(max_substeps, int) or max_substeps < 1:
        raise ValueError(f"`max_substeps` must be a positive integer, got {max_substeps!r}")
    if substeps is None:
        bad = isinstance(rate, bool) or not isinstance(rate, (int, float))
        if bad or not math.isfinite(rate):  # type: ignore[arg-type]
            raise ValueError(f"`rate` must be a finite number, got {rate!r}")
        n = substeps_for(total, float(rate), step_bound)  # type: ignore[arg-type]
    elif isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"`substeps` must be a positive integer or None, got {substeps!r}")
    else:
        n = substeps
    if n > max_substeps:
        raise ValueError(
            f"integrating for time {total:g} needs {n} RK4 sub-steps (rate {rate}), more than "
            f"`max_substeps`={max_substeps}"
        )
    flow = flow or Flow()
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
    steps: int = 1,
    rate_min: float = 0.0,
    rtol: float | None = 1e-3,
) -> WindowDeviation:
    """Integrate the flow from ``start`` for ``time`` and compare its end with ``end``.

    Args:
        operator: the probe Hessian operator (its parameters are restored afterwards).
        start: ``θ_s``, the snapshot (flat, in the operator's parameter order).
        end: ``θ_{s+k}``, where the optimizer got to.
        time: the sum of the effective learning rates of the ``k`` steps.
        rate: the largest eigenvalue of ``−J`` (``flow.rate(λ_max)``).
        c: the cap ``h·ρ ≤ c`` on the sub-step, in ``(0, 2.78]``.
        flow, max_substeps: as in :func:`integrate_flow`.
        steps: the window's optimizer steps ``k`` (pass it: the target scales with ``T/k``).
        rate_min: the smallest eigenvalue of ``−J`` (``flow.rate_min(λ_min)``; negative under
            negative curvature).
        rtol: target integration error relative to the deviation (``None``: only ``h·ρ ≤ c``);
            see :func:`~.flow_steps.window_substeps`.
    """
    n = window_substeps(time, steps, rate, rate_min, rtol=rtol, c=c)
    path = integrate_flow(
        operator, time=time, rate=rate, c=c, flow=flow, start=start, max_substeps=max_substeps,
        substeps=n,
    )  # fmt: skip
    d, rel = deviation(start, end, path.end)
    return WindowDeviation(d, rel, path)
