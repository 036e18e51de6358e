"""HessianEigenvalues at its defaults converges eig_1..eig_5 and lambda_min on small nets with
clustered spectra (float64, against the dense Hessian), cold and warm-started."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_landscape.callbacks import HessianEigenvalues
from lightning_landscape.callbacks.shared import Shared
from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(x.flatten(1))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def setup(kind: str, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = (TinyCNN() if kind == "cnn" else tiny_mlp()).double()
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (1, 6, 6) if kind == "cnn" else (6,)
    x = torch.randn(96, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (96,), generator=gen)
    return model, (x, y)


def sgd(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        ce(model, batch).backward()
        opt.step()


def dense_eigenvalues(op: ProbeHessian) -> torch.Tensor:
    H = torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)])
    return torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)


@pytest.mark.parametrize("kind, seed", [("mlp", 0), ("cnn", 0), ("cnn", 2)])
def test_defaults_converge_top5_and_lambda_min(kind, seed):
    cb = HessianEigenvalues()
    request = cb.solve_request()
    assert (request.k, request.max_iter, request.tol, request.bottom) == (5, 72, 1e-3, True)
    model, batch = setup(kind, seed)
    sgd(model, batch, 30)
    shared = Shared()
    for step in range(3):  # a cold solve, then two warm-started ones
        if step:
            sgd(model, batch, 3)
        op = ProbeHessian(model, Probe.from_samples(batch, batch_size=32), ce)
        exact = dense_eigenvalues(op)
        est = shared.top_k(("probe",), step, op, [request], seed=0)[0].estimate
        top = (est.eigenvalues - exact[:5]).abs() / exact[:5].abs()
        assert float(top.max()) < 1e-2, (step, top)
        assert est.lambda_min == pytest.approx(float(exact[-1]), rel=1e-2)
        assert est.converged and est.matvecs <= request.max_iter


def test_spectra_are_clustered():
    """The point of the test above: neighbours within a few % at eig_5 or lambda_min."""
    for kind in ("mlp", "cnn"):
        model, batch = setup(kind, 0)
        sgd(model, batch, 30)
        ev = dense_eigenvalues(ProbeHessian(model, Probe.from_samples(batch, batch_size=32), ce))
        near = min(float((ev[i] - ev[i + 1]) / ev[0]) for i in range(5))
        bottom = float((ev[-2] - ev[-1]) / ev[0])
        assert min(near, bottom) < 0.02


def test_measure_logs_lambda_min_residual_and_warns_once_at_the_cap():
    model, batch = setup("mlp", 0)
    sgd(model, batch, 30)
    op = ProbeHessian(model, Probe.from_samples(batch, batch_size=32), ce)
    for max_iter, warned in [(12, True), (None, False)]:
        cb = HessianEigenvalues(max_iter=max_iter)
        req = cb.solve_request()
        ctx = SimpleNamespace(
            top_k=lambda r: top_eigen(op, k=r.k, max_iter=r.max_iter, tol=r.tol, bottom=True),
            operator=lambda *_: op,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = [cb.measure(ctx, frozenset({"measure"})) for _ in range(2)]  # type: ignore[arg-type]
        capped = [w for w in caught if "hit its cap" in str(w.message)]
        assert len(capped) == (1 if warned else 0), (req, [str(w.message) for w in caught])
        assert {"eig_5", "lambda_min", "residual", "lambda_min_residual"} <= set(out[0])
        assert out[0]["lambda_min_residual"] >= 0.0
