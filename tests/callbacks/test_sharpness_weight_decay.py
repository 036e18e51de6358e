"""``Sharpness`` with weight decay: coupled (L2) decay enters ``preconditioned``/``ratio``.

Dense references: the probe Hessian ``H`` as an explicit matrix (one product per basis vector)
and ``D`` the per-parameter decays of the optimizer's param groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_landscape.callbacks import Sharpness
from lightning_landscape.callbacks.shared import module_loss
from lightning_landscape.measures.operators import ProbeHessian, flatten
from lightning_landscape.optim.stability import Stability, attach_stability, stability_of

from .helpers import Net, RecordingLogger, loader, trainer

TAG = "landscape/sharpness/"


class DecayNet(Net):
    """The helper net with the optimizer built by ``make(module)``."""

    def __init__(self, make: Callable[[Net], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.make = make

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self)


def _fit(make: Callable[[Net], torch.optim.Optimizer], steps: int) -> tuple[Any, ...]:
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    log = RecordingLogger()
    cb = Sharpness(every_n_steps=steps, probe_size=40, tol=1e-7, max_iter=120, settle_steps=0)
    model = DecayNet(make)
    t = trainer([cb], logger=log, max_steps=steps)
    t.fit(model, loader())
    model.eval()
    op = ProbeHessian(model, cb.probe, module_loss(model))
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.size)]).double()
    return log, cb, t, op, (dense + dense.T) / 2


def _groups(model: Net, wd_first: float, wd_last: float) -> list[dict[str, Any]]:
    first = [p for n, p in model.named_parameters() if not n.startswith("net.4.")]
    return [
        {"params": first, "weight_decay": wd_first},
        {"params": list(model.net[4].parameters()), "weight_decay": wd_last},
    ]


def _top(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(m)[-1])


def test_adam_l2_decay_enters_the_preconditioned_ratio() -> None:
    """Adam(weight_decay=0.1): ratio = λ_max(P^-1/2 (H + 0.1 I) P^-1/2) / threshold."""
    log, cb, t, op, hess = _fit(
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1), 6
    )
    stab = stability_of(t.optimizers[0], op.parameters)
    assert stab is not None and stab.preconditioner is not None and stab.coupled_decay is not None
    s = flatten(stab.preconditioner).double().rsqrt()
    d = flatten([x.reshape(-1) for x in stab.coupled_decay]).double()
    assert torch.equal(d, torch.full_like(d, 0.1, dtype=torch.float32).double())
    exact = _top(s[:, None] * (hess + torch.diag(d)) * s[None, :])
    bare = _top(s[:, None] * hess * s[None, :])
    thr = 38 / 1e-2
    assert log.series(TAG + "threshold")[6] == pytest.approx(thr)
    assert log.series(TAG + "preconditioned")[6] == pytest.approx(exact, rel=1e-4)
    assert log.series(TAG + "ratio")[6] == pytest.approx(exact / thr, rel=1e-4)
    assert exact > 2 * bare  # the decay matters here: ignoring it is far off
    assert log.series(TAG + "lambda_max")[6] == pytest.approx(_top(hess), rel=1e-4)  # unshifted


def test_adamw_decoupled_decay_stays_out() -> None:
    log, cb, t, op, hess = _fit(
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), 6
    )
    stab = stability_of(t.optimizers[0], op.parameters)
    assert stab is not None and stab.preconditioner is not None and stab.coupled_decay is None
    s = flatten(stab.preconditioner).double().rsqrt()
    bare = _top(s[:, None] * hess * s[None, :])
    assert log.series(TAG + "preconditioned")[6] == pytest.approx(bare, rel=1e-4)
    assert log.series(TAG + "ratio")[6] == pytest.approx(bare / (38 / 1e-2), rel=1e-4)


def test_sgd_per_group_decay_gets_its_own_solve_and_constant_decay_none() -> None:
    """Two groups with wd 0.5 and 0.02 (P = I): ratio = λ_max(H + D)/threshold, D per group."""
    make = lambda m: torch.optim.SGD(_groups(m, 0.5, 0.02), lr=0.05, momentum=0.9)  # noqa: E731
    log, cb, t, op, hess = _fit(make, 5)
    stab = stability_of(t.optimizers[0], op.parameters)
    assert stab is not None and not stab.preconditioned and stab.coupled_decay is not None
    d = flatten([x.reshape(-1) for x in stab.coupled_decay]).double()
    assert sorted(set(d.tolist())) == pytest.approx([0.02, 0.5])
    exact = _top(hess + torch.diag(d))
    thr = (2 + 2 * 0.9) / 0.05
    assert log.series(TAG + "ratio")[5] == pytest.approx(exact / thr, rel=1e-4)
    assert log.series(TAG + "lambda_max")[5] == pytest.approx(_top(hess), rel=1e-4)
    assert "decayed" in cb.vectors and TAG + "preconditioned" not in log.tags()

    # one decay for all: λ_max + wd, no extra solve
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.3)  # noqa: E731
    log, cb, t, op, hess = _fit(make, 5)
    lam = log.series(TAG + "lambda_max")[5]
    assert log.series(TAG + "ratio")[5] == pytest.approx(
        (lam + 0.3) / thr, rel=1e-7
    )  # D in float32
    assert log.series(TAG + "ratio")[5] == pytest.approx((_top(hess) + 0.3) / thr, rel=1e-4)
    assert "decayed" not in cb.vectors


def test_rule_with_a_matrix_preconditioner_and_decay_measures_s_h_plus_d_s() -> None:
    """``inverse_sqrt`` (a map, as K-FAC gives) with ``coupled_decay``: ``S (H + D) S``."""

    def rule(opt: torch.optim.Optimizer, params: list[torch.Tensor], base: Any) -> Stability:
        scales = [torch.full_like(p, 0.5 + i) for i, p in enumerate(params)]
        decays = [
            torch.full((), 0.3 if i < 2 else 0.05).expand(p.shape) for i, p in enumerate(params)
        ]

        def inverse_sqrt(vs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [v * s for v, s in zip(vs, scales)]

        return Stability(base.threshold, True, None, "custom", inverse_sqrt, decays)

    def make(m: Net) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        attach_stability(opt, rule)
        return opt

    log, cb, t, op, hess = _fit(make, 5)
    s = torch.cat(
        [
            torch.full((p.numel(),), 0.5 + i, dtype=torch.float64)
            for i, p in enumerate(op.parameters)
        ]
    )
    d = torch.cat(
        [torch.full((p.numel(),), 0.3 if i < 2 else 0.05) for i, p in enumerate(op.parameters)]
    )
    exact = _top(s[:, None] * (hess + torch.diag(d.double())) * s[None, :])
    assert log.series(TAG + "preconditioned")[5] == pytest.approx(exact, rel=1e-4)
    assert log.series(TAG + "ratio")[5] == pytest.approx(exact / (3.8 / 0.05), rel=1e-4)
