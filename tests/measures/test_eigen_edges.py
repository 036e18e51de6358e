"""Edges of the eigen solvers: crossings, stale exact eigenvectors, repeated eigenvalues,
the eigenvalue-error stopping rule, and the Hutch++ product count."""

import pytest
import torch

from lightning_landscape.callbacks.shared import Shared, SolveRequest
from lightning_landscape.measures import lanczos
from lightning_landscape.measures._compat import LambdaOperator
from lightning_landscape.measures.eigen import hutchpp_trace, top_eigen
from lightning_landscape.measures.lanczos import error_bounds


def diag_op(d: torch.Tensor) -> LambdaOperator:
    return LambdaOperator(lambda v: d * v, size=d.numel(), dtype=d.dtype)


def dense_op(A: torch.Tensor) -> LambdaOperator:
    return LambdaOperator(lambda v: A @ v, size=A.shape[0], dtype=A.dtype)


def uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def rotated(eigs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T, q


@pytest.mark.parametrize("k", [1, 2])
def test_eigenvalue_crossing_between_measurements_is_followed(k):
    """diag(5, s, bulk): s climbs from 3 to 9 over 41 measurements and overtakes 5 at the
    14th. Warm-started shared solves (the callbacks' path) follow the top-k throughout."""
    bulk = uniform(58, -0.5, 2.0, seed=0)
    shared = Shared()
    request = SolveRequest(k=k, max_iter=40, tol=1e-3)
    worst = 0.0
    for step in range(41):
        s = 3.0 + 6.0 * step / 40
        d = torch.cat([torch.tensor([5.0, s], dtype=torch.float64), bulk])
        solve, computed = shared.top_k(("probe",), step, diag_op(d), [request], seed=0)
        assert computed and solve.estimate.converged
        truth = torch.sort(d, descending=True).values[:k]
        err = float(((solve.estimate.eigenvalues - truth).abs() / truth).max())
        worst = max(worst, err)
    assert worst <= 1e-3


@pytest.mark.parametrize("seed", range(8))
def test_exact_old_eigenvector_does_not_hide_an_overtaking_eigenvalue(seed):
    """The old top vector is still an exact eigenvector (5.0); 9.0 has overtaken it along a
    direction the warm start lacks. One product would 'converge' on 5.0."""
    d = torch.cat([torch.tensor([5.0, 9.0], dtype=torch.float64), uniform(38, 0.0, 2.0, seed)])
    old = torch.zeros(40, dtype=torch.float64)
    old[0] = 1.0
    est = top_eigen(diag_op(d), k=1, max_iter=40, tol=1e-3, min_iter=1, warm_start=old[None])
    assert est.lambda_max == pytest.approx(9.0, rel=1e-3)
    assert est.converged and est.matvecs >= 3  # p = 1 warm direction + 2 fresh dimensions


def test_cold_solve_does_not_converge_on_the_second_eigenvalue():
    """λ1 = 3.81 just above λ2 = 3.48, n = 3000: from a random start the Ritz value first
    settles on λ2 with a tiny ρ²/δ; cold solves stop on the residual instead."""
    d = torch.cat([torch.tensor([3.81, 3.48], dtype=torch.float64), uniform(2998, 0.0, 3.0, 1)])
    for seed in range(4):
        est = top_eigen(diag_op(d), k=1, max_iter=60, tol=1e-3, seed=seed)
        assert est.lambda_max == pytest.approx(3.81, rel=1e-3)
        assert float(est.residuals[0]) <= 1e-3  # the residual rule


def test_repeated_top_eigenvalue_k2_returns_both_copies():
    eigs = torch.cat([torch.tensor([7.0, 7.0, 4.0]), uniform(57, 0.0, 3.0, 2)]).double()
    A, q = rotated(eigs, seed=3)
    cold = top_eigen(dense_op(A), k=2, max_iter=60, tol=1e-6)
    torch.testing.assert_close(
        cold.eigenvalues, torch.tensor([7.0, 7.0]).double(), rtol=1e-6, atol=0
    )
    # warm: the two were split (7.3, 6.7) at the previous measurement and merged since
    split = eigs.clone()
    split[0], split[1] = 7.3, 6.7
    prev = top_eigen(dense_op(q @ torch.diag(split) @ q.T), k=2, max_iter=60, tol=1e-6)
    warm = top_eigen(dense_op(A), k=2, max_iter=60, tol=1e-6, warm_start=prev.warm_start())
    torch.testing.assert_close(
        warm.eigenvalues, torch.tensor([7.0, 7.0]).double(), rtol=1e-6, atol=0
    )
    assert warm.matvecs < cold.matvecs
    # the documented limitation: one start vector holds one copy (the second value is 4)
    single = top_eigen(dense_op(A), k=2, max_iter=60, tol=1e-6, block=1)
    assert single.eigenvalues.tolist() == pytest.approx([7.0, 4.0], rel=1e-6)


def test_error_bounds_quadratic_when_the_gap_is_resolved_else_the_residual():
    theta = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    res = torch.tensor([0.1, 0.1, 0.01], dtype=torch.float64)
    b = error_bounds(theta, res)
    assert float(b[2]) == pytest.approx(0.01**2 / (3.0 - 1.0 - 0.1))
    # a cluster: the gap to the neighbour minus its residual is below the residual
    theta = torch.tensor([1.0, 3.0, 3.0005], dtype=torch.float64)
    res = torch.tensor([0.1, 0.01, 0.01], dtype=torch.float64)
    assert error_bounds(theta, res)[1:].tolist() == pytest.approx([0.01, 0.01])


def test_warm_solve_stops_on_the_eigenvalue_bound_and_the_bound_holds():
    eigs = torch.cat([torch.tensor([10.0, 6.0]), uniform(198, -1.0, 3.0, 4)]).double()
    A, _ = rotated(eigs, seed=5)
    prev = top_eigen(dense_op(A), k=1, max_iter=80, tol=1e-8)
    E, _ = rotated(torch.randn(200, generator=torch.Generator().manual_seed(6)).double(), 7)
    B = A + 2e-2 * E
    exact = float(torch.linalg.eigvalsh(B)[-1])
    est = top_eigen(dense_op(B), k=1, max_iter=80, tol=1e-3, warm_start=prev.warm_start())
    assert est.converged and float(est.errors[0]) <= 1e-3
    assert float(est.residuals[0]) > 1e-3  # the residual rule would have gone on
    assert abs(est.lambda_max - exact) / exact <= float(est.errors[0])
    # the same solve under the residual rule (no warm directions to anchor the bound)
    monkey = lanczos.ANCHOR
    try:
        lanczos.ANCHOR = 2.0
        strict = top_eigen(dense_op(B), k=1, max_iter=80, tol=1e-3, warm_start=prev.warm_start())
    finally:
        lanczos.ANCHOR = monkey
    assert strict.matvecs > est.matvecs and float(strict.residuals[0]) <= 1e-3


@pytest.mark.parametrize("n, budget, ran", [(10, 60, 50), (100, 60, 60), (100, 31, 30)])
def test_hutchpp_counts_the_products_that_ran(n, budget, ran):
    calls = [0]
    A = torch.diag(torch.linspace(1.0, 2.0, n, dtype=torch.float64))

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return A @ v

    op = LambdaOperator(matvec, size=n, dtype=torch.float64)
    tr = hutchpp_trace(op, matvecs=budget, seed=0)
    assert tr.matvecs == calls[0] == ran
    if n < budget // 3:  # the sketch spans everything: exact
        assert tr.estimate == pytest.approx(float(A.trace()), rel=1e-9)
