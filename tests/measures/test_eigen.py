import pytest
import torch

from lightning_landscape.measures._compat import LambdaOperator
from lightning_landscape.measures.eigen import hutchpp_trace, slq_density, top_eigen
from lightning_landscape.measures.operators import ProbeHessian

from .helpers import ce_loss, dense_hessian, probe_of, tiny_data, tiny_mlp


def dense_op(A: torch.Tensor) -> LambdaOperator:
    return LambdaOperator(lambda v: A @ v, size=A.shape[0], dtype=A.dtype)


def random_symmetric(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(
            len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    )
    return q @ torch.diag(eigs) @ q.T


def test_top_k_and_lambda_min_match_dense_hessian():
    model = tiny_mlp()
    x, y = tiny_data(13)
    H = dense_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(H)
    est = top_eigen(
        ProbeHessian(model, probe_of(x, y, 4), ce_loss), k=3, max_iter=40, tol=1e-8, bottom=True
    )
    torch.testing.assert_close(est.eigenvalues, exact.flip(0)[:3], rtol=1e-7, atol=1e-9)
    assert est.lambda_min == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)
    assert est.converged


def test_largest_algebraic_not_largest_magnitude():
    # the most negative eigenvalue dominates in magnitude; sharpness is still the largest algebraic
    eigs = torch.tensor([-50.0, -3.0, 0.5, 1.0, 2.0, 4.0] + [0.1] * 24, dtype=torch.float64)
    A = random_symmetric(eigs)
    est = top_eigen(dense_op(A), k=2, max_iter=30, tol=1e-10)
    torch.testing.assert_close(
        est.eigenvalues, torch.tensor([4.0, 2.0], dtype=torch.float64), rtol=1e-8, atol=1e-8
    )
    assert est.lambda_min == pytest.approx(-50.0, rel=1e-8)


def test_reported_residual_is_the_true_residual():
    eigs = torch.linspace(-1, 10, 40, dtype=torch.float64)
    A = random_symmetric(eigs, seed=3)
    est = top_eigen(dense_op(A), k=2, max_iter=8, tol=1e-12)  # stops at max_iter, unconverged
    assert not est.converged and est.matvecs == 8
    for lam, v, r in zip(est.eigenvalues, est.eigenvectors, est.residuals):
        true = (A @ v - lam * v).norm() / lam.abs()
        assert float(r) == pytest.approx(float(true), rel=1e-6)


def test_warm_start_reaches_tol_in_few_products():
    torch.manual_seed(0)
    eigs = torch.cat([torch.tensor([5.0, 4.6, 4.3]), torch.rand(197) * 4]).double()
    A = random_symmetric(eigs, seed=1)
    cold = top_eigen(dense_op(A), k=1, max_iter=60, tol=1e-3)
    # a small step of training: the matrix moves a little
    E = random_symmetric(torch.randn(200, dtype=torch.float64), seed=2)
    B = A + 1e-3 * E
    warm = top_eigen(dense_op(B), k=1, max_iter=60, tol=1e-3, warm_start=cold.warm_start())
    top = top_eigen(dense_op(B), k=1, max_iter=60, tol=1e-3, warm_start=cold.eigenvectors)
    exact = float(torch.linalg.eigvalsh(B)[-1])
    # the fresh random direction (weight 1) and the next Ritz vector of a cold solve cost a few
    # products on a spectrum whose bulk reaches 80 % of λ_max; from the top vector alone: 5
    assert top.matvecs <= 5 < warm.matvecs < cold.matvecs
    for est in (warm, top):
        assert abs(est.lambda_max - exact) / exact < 1e-3  # tol bounds the eigenvalue error
        assert est.converged and float(est.errors[0]) <= 1e-3


def test_warm_start_still_finds_a_new_top_direction():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5] * 5, dtype=torch.float64))
    first = top_eigen(dense_op(A), k=1, max_iter=20, tol=1e-10)
    B = A.clone()
    B[19, 19] = 6.0  # a direction the warm start has (almost) no component on
    est = top_eigen(
        dense_op(B), k=1, max_iter=20, tol=1e-6, min_iter=3, warm_start=first.warm_start()
    )
    assert est.lambda_max == pytest.approx(6.0, rel=1e-6)


def test_deterministic_given_seed():
    A = random_symmetric(torch.linspace(0, 1, 30, dtype=torch.float64))
    a = top_eigen(dense_op(A), k=2, max_iter=10, tol=1e-12, seed=5)
    b = top_eigen(dense_op(A), k=2, max_iter=10, tol=1e-12, seed=5)
    assert torch.equal(a.eigenvalues, b.eigenvalues)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"k": 0}, "k"), ({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol"), ({"k": 50}, "k")],
)
def test_bad_arguments(kwargs, name):
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"`{name}`"):
        top_eigen(dense_op(A), **kwargs)


def test_hutchpp_trace_within_statistical_tolerance():
    eigs = torch.cat(
        [
            torch.tensor([40.0, 20.0, 10.0]),
            torch.rand(97, generator=torch.Generator().manual_seed(0)),
        ]
    ).double()
    A = random_symmetric(eigs, seed=4)
    errors = [
        abs(hutchpp_trace(dense_op(A), matvecs=30, seed=s).estimate - float(eigs.sum()))
        for s in range(10)
    ]
    assert sum(errors) / len(errors) < 0.03 * float(eigs.sum())


def test_hutchpp_trace_exact_on_low_rank():
    eigs = torch.tensor([5.0, 3.0] + [0.0] * 28, dtype=torch.float64)
    A = random_symmetric(eigs, seed=6)
    assert hutchpp_trace(dense_op(A), matvecs=30).estimate == pytest.approx(8.0, rel=1e-9)


def test_slq_density_integrates_to_one_and_locates_mass():
    eigs = torch.cat([torch.zeros(50), torch.full((10,), 5.0)]).double()
    A = random_symmetric(eigs, seed=7)
    dens = slq_density(dense_op(A), runs=6, lanczos_steps=20, seed=0)
    grid, d = torch.tensor(dens.grid), torch.tensor(dens.density)
    assert float(torch.trapezoid(d, grid)) == pytest.approx(1.0, abs=0.02)
    mass_high = float(torch.trapezoid(d[grid > 2.5], grid[grid > 2.5]))
    assert mass_high == pytest.approx(10 / 60, abs=0.08)
