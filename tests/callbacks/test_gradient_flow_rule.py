"""``GradientFlowDeviation`` at its defaults: error-controlled windows under negative curvature
and on long windows of small steps, against closed forms; the ``max_substeps`` cap."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks.gradient_flow import GradientFlowDeviation

from .helpers import RecordingLogger, trainer

F64 = torch.float64
TAG = "landscape/gradient_flow/"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class IndefiniteQuadratic(pl.LightningModule):
    """``L(θ) = ½θᵀAθ`` with ``A = diag(evals)`` (negative entries: negative curvature)."""

    a: torch.Tensor

    def __init__(self, evals: list[float], lr: float) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(evals, dtype=F64))
        self.theta = nn.Parameter(torch.linspace(0.5, 1.0, len(evals), dtype=F64))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.5 * (self.a * self.theta**2).sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit_quadratic(cb: GradientFlowDeviation, evals: list[float], lr: float, steps: int) -> Any:
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.zeros(8, 1, dtype=F64)), batch_size=8)
    trainer([cb], logger=log, max_steps=steps).fit(IndefiniteQuadratic(evals, lr), data)
    return log


@pytest.mark.parametrize(
    "evals, lr, k",
    [([1.0, 0.2, -5.0], 0.1, 10), ([1.0, 0.5, 0.1, -0.2], 0.05, 20)],
    ids=["negative-curvature", "long-window-small-steps"],
)
def test_defaults_resolve_negative_curvature_and_small_deviations(
    evals: list[float], lr: float, k: int
) -> None:
    """Default rk4_c/rtol: the logged deviation is within 1e-2 of exp(−AT)θ_s vs (1 − ηA)^kθ_s
    (λ_min from the callback's own solve; the old λ_max-only rule read 0.12 for 0.62)."""
    cb = GradientFlowDeviation(
        settle_steps=0, every_n_steps=1000, probe_size=8, window=k, window_every_n_steps=k
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log = fit_quadratic(cb, evals, lr, 2 * k)
    a = torch.tensor(evals, dtype=F64)
    theta0 = torch.linspace(0.5, 1.0, len(evals), dtype=F64)
    devs = log.series(TAG + "deviation")
    assert sorted(devs) == [k, 2 * k]
    for end, got in devs.items():
        start = (1 - lr * a) ** (end - k) * theta0
        stop, flow = (1 - lr * a) ** k * start, torch.exp(-a * k * lr) * start
        exact = float((stop - flow).norm() / (flow - start).norm())
        assert got == pytest.approx(exact, rel=1e-2), (end, got, exact)
    assert cb.vectors["window_bottom"].numel() == len(evals)  # the λ_min warm start is kept


def test_max_substeps_warns_once_and_skips_the_windows() -> None:
    cb = GradientFlowDeviation(settle_steps=0, every_n_steps=1000, probe_size=8, window=5, window_every_n_steps=5,
                               max_substeps=2)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_quadratic(cb, [1.0, -2.0], 0.1, 15)
    assert sum("more than max_substeps=2" in str(w.message) for w in caught) == 1
    assert log.series(TAG + "deviation") == {}
