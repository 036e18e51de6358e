"""Step gap and window deviation against closed forms (quadratics) and dense references."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_landscape.measures.gradient_flow import (
    Flow,
    deviation,
    integrate_flow,
    step_gap,
    substeps_for,
    window_deviation,
    window_substeps,
)
from lightning_landscape.measures.operators import NonFiniteError, ProbeHessian, flatten
from lightning_landscape.measures.probe import Probe

from .helpers import ce_loss, dense_hessian, probe_of, tiny_data, tiny_mlp

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is ~20x faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Quadratic(nn.Module):
    """``L(θ) = ½ θᵀAθ`` as a module with one parameter ``θ``."""

    def __init__(self, a: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.theta = nn.Parameter(theta.clone())

    def loss(self, _batch: object) -> torch.Tensor:
        return 0.5 * self.theta @ (self.a @ self.theta)


def quadratic(a: torch.Tensor, theta: torch.Tensor) -> ProbeHessian:
    model = Quadratic(a, theta)
    probe = Probe.from_samples(torch.zeros(3, 1, dtype=F64))
    return ProbeHessian(model, probe, lambda m, b: m.loss(b))


def spd(n: int, seed: int, low: float = 0.1, high: float = 4.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    evals = torch.linspace(low, high, n, dtype=F64)
    return q @ torch.diag(evals) @ q.T


def rand(n: int, seed: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)


def adam_like(a: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """An Adam-like diagonal ``P = √v + ε`` from the squared gradient (spread over 2 decades)."""
    g = a @ theta
    return g.abs() * rand(len(theta), 9, 0.5, 2.0) + 1e-2


def jacobian(a: torch.Tensor, inv: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``J = −P⁻¹(A + C) − D`` of the flow ``θ̇ = −P⁻¹(Aθ + c⊙θ) − d⊙θ``."""
    return -inv[:, None] * (a + torch.diag(c)) - torch.diag(d)


def rk4_polynomial(m: torch.Tensor, h: float) -> torch.Tensor:
    """RK4 on ``θ̇ = Mθ`` is exactly ``θ ← R(hM)θ`` with ``R(X) = I + X + X²/2 + X³/6 + X⁴/24``."""
    x = h * m
    eye = torch.eye(len(m), dtype=F64)
    return eye + x + x @ x / 2 + x @ x @ x / 6 + x @ x @ x @ x / 24


# -- step gap ------------------------------------------------------------------------------------
def test_step_gap_equals_its_closed_form_on_a_quadratic() -> None:
    a, theta = spd(6, 0), rand(6, 1)
    op = quadratic(a, theta)
    for eta in (1e-3, 0.1, 0.7):
        gap = step_gap(op, eta)
        g = a @ theta
        exact = 0.5 * eta * float((a @ g).norm() / g.norm())
        assert gap.value == pytest.approx(exact, rel=1e-13)
        assert (gap.gradients, gap.hvps, gap.lr) == (1, 1, eta)
        assert gap.loss == pytest.approx(float(0.5 * theta @ a @ theta), rel=1e-13)


def test_preconditioned_step_gap_with_decays_equals_its_closed_form() -> None:
    """Step θ − ηP⁻¹(g + cθ) − ηdθ against θ̇ = −P⁻¹(∇L + cθ) − dθ: (η/2)‖JF‖/‖F‖."""
    a, theta = spd(5, 2), rand(5, 3)
    p = adam_like(a, theta)
    c, d = rand(5, 4, 0.0, 0.1), rand(5, 5, 0.0, 0.05)
    op = quadratic(a, theta)
    eta = 0.05
    for flow, cc, dd in (
        (Flow.preconditioned(p), torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)),
        (Flow.preconditioned(p, coupled=c, decoupled=d), c, d),
    ):
        j = jacobian(a, 1 / p, cc, dd)
        f = j @ theta  # the field is linear here: F(θ) = Jθ
        exact = 0.5 * eta * float((j @ f).norm() / f.norm())
        assert step_gap(op, eta, flow=flow).value == pytest.approx(exact, rel=1e-13)
    # plain formula (η/2)‖P⁻¹HP⁻¹g‖/‖P⁻¹g‖ when there is no decay
    u = (a @ theta) / p
    expected = 0.5 * eta * float(((a @ u) / p).norm() / u.norm())
    assert step_gap(op, eta, flow=Flow.preconditioned(p)).value == pytest.approx(
        expected, rel=1e-13
    )


def test_step_gap_on_an_mlp_matches_the_dense_hessian() -> None:
    model, (x, y) = tiny_mlp(), tiny_data(13)
    op = ProbeHessian(model, probe_of(x, y, 5), ce_loss)
    h = dense_hessian(model, x, y)
    loss = ce_loss(model, (x, y))
    g = flatten(torch.autograd.grad(loss, list(model.parameters())))
    eta = 0.3
    exact = 0.5 * eta * float((h @ g).norm() / g.norm())
    assert step_gap(op, eta).value == pytest.approx(exact, rel=1e-11)
    p = rand(op.size, 7, 0.2, 3.0)
    u = g / p
    exact_pre = 0.5 * eta * float(((h @ u) / p).norm() / u.norm())
    assert step_gap(op, eta, flow=Flow.preconditioned(p)).value == pytest.approx(
        exact_pre, rel=1e-11
    )
    assert torch.equal(op.vector(), flatten([q.detach() for q in model.parameters()]))


def test_step_gap_is_zero_at_a_stationary_point() -> None:
    op = quadratic(spd(3, 1), torch.zeros(3, dtype=F64))
    gap = step_gap(op, 0.5)
    assert (gap.value, gap.hvps, gap.speed) == (0.0, 0, 0.0)


# -- RK4 and the window --------------------------------------------------------------------------
def test_rk4_is_exactly_the_rk4_polynomial_on_a_linear_flow() -> None:
    a, theta = spd(5, 3), rand(5, 4)
    p = adam_like(a, theta)
    c, d = rand(5, 5, 0.0, 0.2), rand(5, 6, 0.0, 0.1)
    flow = Flow.preconditioned(p, coupled=c, decoupled=d)
    j = jacobian(a, 1 / p, c, d)
    lam = float(torch.linalg.eigvals(-j).real.max())
    op = quadratic(a, theta)
    path = integrate_flow(op, time=0.8, rate=lam, c=0.7, flow=flow)
    n = math.ceil(0.8 * lam / 0.7)
    assert (path.substeps, path.gradients) == (n, 4 * n)
    assert path.step_size == pytest.approx(0.8 / n, rel=1e-15)
    expected = torch.linalg.matrix_power(rk4_polynomial(j, 0.8 / n), n) @ theta
    torch.testing.assert_close(path.end, expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(op.vector(), theta)  # the operator's parameters are back


def test_window_deviation_matches_the_closed_form_to_rk4_accuracy() -> None:
    """GD for k steps vs exp(−A kη)θ_s; the error of D shrinks like c⁴ (order-4 method)."""
    a, theta = spd(6, 4, 0.05, 3.0), rand(6, 5)
    op = quadratic(a, theta)
    lam = float(torch.linalg.eigvalsh(a)[-1])
    for eta, k in ((0.05, 5), (0.5, 3), (0.64, 8)):  # ηλ = 0.15, 1.5, 1.92
        end = torch.linalg.matrix_power(torch.eye(6, dtype=F64) - eta * a, k) @ theta
        flow_end = torch.linalg.matrix_exp(-a * (k * eta)) @ theta
        exact = float((end - flow_end).norm() / (flow_end - theta).norm())
        errors = []
        for c in (0.4, 0.2, 0.1):  # the fixed-c rule (rtol=None)
            w = window_deviation(op, start=theta, end=end, time=k * eta, rate=lam, c=c, rtol=None)
            errors.append(abs(w.deviation - exact))
            assert w.gradients == 4 * math.ceil(k * eta * lam / c)
        assert errors[-1] <= 1e-5 * exact
        assert errors[0] / errors[1] > 10 and errors[1] / errors[2] > 10  # ≈ 16: 4th order


def test_preconditioned_window_matches_the_closed_form() -> None:
    """Adam-like frozen P: θ ← θ − ηP⁻¹∇L against θ(T) = exp(−P⁻¹A T)θ_s."""
    a, theta = spd(5, 6, 0.1, 2.0), rand(5, 7)
    p = adam_like(a, theta)
    flow = Flow.preconditioned(p)
    m = torch.diag(1 / p) @ a
    lam = float(torch.linalg.eigvals(m).real.max())  # = λ_max(P^-1/2 A P^-1/2)
    s = p.rsqrt()
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(s[:, None] * a * s).max()), rel=1e-12)
    eta, k = 1.2 / lam, 6
    end = torch.linalg.matrix_power(torch.eye(5, dtype=F64) - eta * m, k) @ theta
    flow_end = torch.linalg.matrix_exp(-m * (k * eta)) @ theta
    exact = float((end - flow_end).norm() / (flow_end - theta).norm())
    w = window_deviation(quadratic(a, theta), start=theta, end=end, time=k * eta, rate=lam,
                         c=0.1, flow=flow)  # fmt: skip
    assert w.deviation == pytest.approx(exact, rel=1e-6)
    assert w.relative_to_steps == pytest.approx(
        float((end - flow_end).norm() / (end - theta).norm()), rel=1e-6
    )


def gd_window(evals: list[float], eta: float, k: int, seed: int = 11) -> tuple:
    """``A = diag(evals)``, ``θ_s`` random: k GD steps and the exact deviation from exp(−AT)θ_s."""
    a, theta = torch.diag(torch.tensor(evals, dtype=F64)), rand(len(evals), seed)
    end = torch.linalg.matrix_power(torch.eye(len(evals), dtype=F64) - eta * a, k) @ theta
    flow_end = torch.linalg.matrix_exp(-a * (k * eta)) @ theta
    return a, theta, end, float((end - flow_end).norm() / (flow_end - theta).norm())


DEFAULT_CASES = {  # the three cases: long windows of small steps, negative curvature
    "z=0.05,k=20": ([1.0, 0.6, 0.3, 0.1, -0.2], 0.05, 20),
    "z=0.01,k=100": ([1.0, 0.6, 0.3, 0.1, -0.2], 0.01, 100),
    "lmin=-5,eta=0.1,k=10": ([1.0, 0.3, -0.5, -5.0], 0.1, 10),
}


@pytest.mark.parametrize("case", list(DEFAULT_CASES))
def test_window_at_the_defaults_is_within_1e_2_of_the_closed_form(case: str) -> None:
    """Error-controlled sub-steps: 1e-2 relative (≈5e-4 measured) where a fixed h·λ_max ≤ 1 is
    off by 59%, 314% and 81% (it ignores λ_min and the size of the deviation)."""
    evals, eta, k = DEFAULT_CASES[case]
    a, theta, end, exact = gd_window(evals, eta, k)
    op = quadratic(a, theta)
    kw = {"start": theta, "end": end, "time": k * eta, "rate": max(evals)}
    w = window_deviation(op, steps=k, rate_min=min(evals), **kw)
    assert w.deviation == pytest.approx(exact, rel=1e-2)
    assert abs(w.deviation / exact - 1) < 1e-3  # rtol(1 + D) bounds it; measured ≈ 5e-4
    n = window_substeps(k * eta, k, max(evals), min(evals))
    assert (w.path.substeps, w.gradients) == (n, 4 * n)  # each RK4 stage is one probe gradient
    assert n == {"z=0.05,k=20": 5, "z=0.01,k=100": 7, "lmin=-5,eta=0.1,k=10": 14}[case]
    old = window_deviation(op, rtol=None, **kw)  # the previous rule: n = ceil(Tλ_max/c)
    assert old.gradients == 4 and abs(old.deviation / exact - 1) > 0.5


def test_momentum_and_adam_like_windows_at_the_defaults() -> None:
    """Heavy ball (the flow for the effective step lr/(1−β)) and a frozen Adam-like P on an
    indefinite quadratic: exact discrete iterates against exp(−P⁻¹A T)θ_s."""
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.tensor([1.5, 0.7, 0.2, -0.4, -2.0], dtype=F64)) @ q.T
    theta = rand(5, 6)
    lr, beta, k = 0.004, 0.9, 25  # effective step 0.04: z = 0.06 on λ_max, −0.08 on λ_min
    x, v = theta.clone(), torch.zeros(5, dtype=F64)
    for _ in range(k):
        v = beta * v + a @ x
        x = x - lr * v
    time = k * lr / (1 - beta)
    lam = torch.linalg.eigvalsh(a)
    flow_end = torch.linalg.matrix_exp(-a * time) @ theta
    exact = float((x - flow_end).norm() / (flow_end - theta).norm())
    w = window_deviation(quadratic(a, theta), start=theta, end=x, time=time, steps=k,
                         rate=float(lam[-1]), rate_min=float(lam[0]))  # fmt: skip
    assert w.deviation == pytest.approx(exact, rel=1e-3)
    # Adam-like: θ ← θ − ηP⁻¹Aθ, spectrum of P^-1/2 A P^-1/2
    p = adam_like(a, theta)
    m = a / p[:, None]
    s = p.rsqrt()
    mu = torch.linalg.eigvalsh(s[:, None] * a * s)
    eta, k = 0.05 / float(mu.abs().max()), 20
    end = torch.linalg.matrix_power(torch.eye(5, dtype=F64) - eta * m, k) @ theta
    flow_end = torch.linalg.matrix_exp(-m * (k * eta)) @ theta
    exact = float((end - flow_end).norm() / (flow_end - theta).norm())
    flow = Flow.preconditioned(p)
    w = window_deviation(quadratic(a, theta), start=theta, end=end, time=k * eta, steps=k,
                         rate=flow.rate(float(mu[-1])), rate_min=flow.rate_min(float(mu[0])),
                         flow=flow)  # fmt: skip
    assert w.deviation == pytest.approx(exact, rel=1e-2)


def test_integrate_flow_takes_a_given_number_of_substeps() -> None:
    a, theta = torch.diag(torch.tensor([1.0, -2.0], dtype=F64)), rand(2, 3)
    path = integrate_flow(quadratic(a, theta), time=0.9, substeps=7)
    assert (path.substeps, path.gradients) == (7, 28)
    expected = torch.linalg.matrix_power(rk4_polynomial(-a, 0.9 / 7), 7) @ theta
    torch.testing.assert_close(path.end, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("z", [0.01, 0.3, 1.0, 2.0, 3.0])
def test_one_eigendirection_identity(z: float) -> None:
    """1-D ``L = ½λθ²``, one GD step of η = z/λ against the flow for time η.

    Normalised by the step, ‖θ_1 − θ_flow‖/‖θ_1 − θ_0‖ = |1 − z − e^−z|/z (0.57 at z = 2);
    by the flow's displacement (the logged D) it is |1 − z − e^−z|/(1 − e^−z). The step gap
    is the small-z limit z/2 of the former, within z²/6.
    """
    lam = 2.5
    a, theta = torch.tensor([[lam]], dtype=F64), torch.tensor([0.8], dtype=F64)
    op = quadratic(a, theta)
    eta = z / lam
    end = (1 - z) * theta
    w = window_deviation(op, start=theta, end=end, time=eta, rate=lam, c=0.01)
    identity = abs(1 - z - math.exp(-z)) / z
    assert w.relative_to_steps == pytest.approx(identity, rel=1e-7)
    assert w.deviation == pytest.approx(abs(1 - z - math.exp(-z)) / (1 - math.exp(-z)), rel=1e-7)
    gap = step_gap(op, eta).value
    assert gap == pytest.approx(z / 2, rel=1e-14)
    assert 0 <= gap - identity <= z * z / 6
    if z == 2.0:
        assert identity == pytest.approx(0.5677, abs=1e-4)


def test_rk4_converges_at_order_four_on_an_mlp() -> None:
    model, (x, y) = tiny_mlp(activation=nn.Tanh), tiny_data(13)
    op = ProbeHessian(model, probe_of(x, y, 5), ce_loss)
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, x, y))[-1])
    time = 6.0 / lam
    ref = integrate_flow(op, time=time, rate=lam, c=0.1).end
    errs = [
        float((integrate_flow(op, time=time, rate=lam, c=c).end - ref).norm()) for c in (0.8, 0.4)
    ]
    assert 10 < errs[0] / errs[1] < 22
    # and the flow really moved downhill
    start = op.vector()
    op.set_vector(ref)
    assert op.loss() < float(ce_loss(tiny_mlp(), (x, y)).detach())
    op.set_vector(start)


def test_deviation_of_gradient_descent_vanishes_with_the_learning_rate() -> None:
    """k full-probe GD steps on an MLP: D ≈ C·η (first order)."""
    model, (x, y) = tiny_mlp(), tiny_data(13)
    op = ProbeHessian(model, probe_of(x, y, 13), ce_loss)
    start = op.vector()
    values = []
    for eta in (0.04, 0.02, 0.01):
        theta = start.clone()
        for _ in range(4):
            op.set_vector(theta)
            theta = theta - eta * op.loss_and_gradient()[1]
        op.set_vector(start)
        values.append(window_deviation(op, start=start, end=theta, time=4 * eta, rate=5.0,
                                       c=0.1).deviation)  # fmt: skip
    assert values[0] / values[1] == pytest.approx(2.0, rel=0.1)
    assert values[1] / values[2] == pytest.approx(2.0, rel=0.1)


# -- failures and arguments ----------------------------------------------------------------------
def test_non_finite_probe_and_blown_up_flow_raise() -> None:
    model, (x, y) = tiny_mlp(), tiny_data(6)
    x[2, 1] = float("nan")
    op = ProbeHessian(model, probe_of(x, y, 3), ce_loss)
    with pytest.raises(NonFiniteError):
        step_gap(op, 0.1)
    with pytest.raises(NonFiniteError):
        window_deviation(op, start=op.vector(), end=op.vector(), time=0.1, rate=1.0)
    # a rate understated 100-fold: RK4 is unstable (h·λ = 100) and overflows
    a, theta = torch.tensor([[1.0]], dtype=F64), torch.tensor([1.0], dtype=F64)
    with pytest.raises(NonFiniteError):
        integrate_flow(quadratic(a, theta), time=1e4, rate=0.01, c=1.0)  # R(−100)^100


def test_deviation_helper() -> None:
    s, e, f = (torch.tensor(v, dtype=F64) for v in ([0.0, 0.0], [3.0, 0.0], [0.0, 4.0]))
    assert deviation(s, e, f) == (5.0 / 4.0, 5.0 / 3.0)
    assert deviation(s, s, s) == (0.0, 0.0)
    assert deviation(s, e, s) == (math.inf, 1.0)
    with pytest.raises(ValueError, match="same size"):
        deviation(s, e, torch.zeros(3))
    assert substeps_for(1.0, 3.0, 1.0) == 3 and substeps_for(1.0, -2.0, 1.0) == 1


def window(op: ProbeHessian, **kw: object) -> object:
    return window_deviation(op, start=op.vector(), end=op.vector(), rate=1.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda op: step_gap(op, 0.0), "lr"),
        (lambda op: step_gap(op, float("nan")), "lr"),
        (lambda op: step_gap(op, True), "lr"),
        (lambda op: integrate_flow(op, time=-1.0, rate=1.0), "time"),
        (lambda op: integrate_flow(op, time=1.0, rate=float("inf")), "rate"),
        (lambda op: integrate_flow(op, time=1.0, rate=1.0, c=0.0), "c"),
        (lambda op: integrate_flow(op, time=1.0, rate=1.0, c=3.0), "c"),
        (lambda op: integrate_flow(op, time=1.0, rate=1.0, max_substeps=0), "max_substeps"),
        (lambda op: integrate_flow(op, time=1e6, rate=1.0, max_substeps=10), "max_substeps"),
        (lambda op: integrate_flow(op, time=1.0, substeps=0), "substeps"),
        (lambda op: integrate_flow(op, time=1.0), "rate"),
        (lambda op: window(op, time=1.0, steps=0), "steps"),
        (lambda op: window(op, time=1.0, rtol=0.0), "rtol"),
        (lambda op: window(op, time=1e3, rate_min=-50.0, max_substeps=100), "max_substeps"),
        (lambda op: step_gap(op, 0.1, flow=Flow(inverse=torch.ones(5, dtype=F64))), "inverse"),
        (lambda op: Flow(coupled=-torch.ones(2, dtype=F64)), "coupled"),
        (lambda op: Flow(decoupled=torch.ones(2, 2)), "decoupled"),
        (lambda op: Flow.preconditioned(torch.zeros(2, dtype=F64)), "diagonal"),
    ],
)
def test_bad_arguments_name_the_argument(call, arg) -> None:
    op = quadratic(spd(2, 0), rand(2, 1))
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call(op)
