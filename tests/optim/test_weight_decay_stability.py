"""Coupled weight decay in the stability registry: ``D`` enters the operator, per param group.

Every row runs the real optimizer on ``L = ½ θᵀAθ`` with a dense SPD ``A`` over two parameter
tensors in two param groups with *different* ``weight_decay``. With coupled decay the iteration
follows ``(A + D)θ``; ``A`` is scaled so that the ratio computed the way ``Sharpness`` does
(``decay_vector`` / ``ShiftedOperator`` / ``shifted_preconditioned`` and Lanczos, checked against
the dense ``eigvalsh`` of ``P^-1/2 (A + D) P^-1/2``) is 0.97 or 1.03: stable just below,
divergent just above, while the bare ratio (no decay) and the ratio with one group's decay
everywhere would both call the divergent runs stable. Adaptive rows freeze ``P`` with a huge
``eps`` and start at 1e-200 (see ``test_stability.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_landscape.measures._compat import LambdaOperator
from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.operators import flatten
from lightning_landscape.measures.shifted import (
    ShiftedOperator,
    constant_shift,
    decay_vector,
    shifted_preconditioned,
)
from lightning_landscape.optim import ARSG, RSG, NovoGrad, Stability, stability_of

from .test_stability import DT, _assert_verdict

N = 4  # entries per parameter tensor; θ = (x1, x2)


def _spd(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(2 * N, 2 * N, generator=gen, dtype=DT))
    spectrum = torch.tensor([1.0, 0.7, 0.5, 0.35, 0.2, 0.1, 0.05, 0.02], dtype=DT)
    return q @ torch.diag(spectrum) @ q.T


def _start(scale: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    x = scale * (torch.rand(2 * N, generator=gen, dtype=DT) + 0.5)
    return [torch.nn.Parameter(x[:N].clone()), torch.nn.Parameter(x[N:].clone())]


def callback_ratio(stab: Stability, a: torch.Tensor) -> float:
    """The ratio as ``Sharpness.measure`` computes it, on the operator ``v ↦ A v``."""
    op = LambdaOperator(lambda v: a @ v, size=a.shape[0], dtype=DT)
    decay = decay_vector(stab.coupled_decay, op)
    kw: dict[str, Any] = {"k": 1, "max_iter": a.shape[0], "tol": 1e-13}
    if stab.preconditioned:
        assert stab.preconditioner is not None
        diag = flatten([p.reshape(-1) for p in stab.preconditioner])
        lam = top_eigen(shifted_preconditioned(op, decay, diag), **kw).lambda_max
    elif decay is None:
        lam = top_eigen(op, **kw).lambda_max
    elif (shift := constant_shift(decay)) is not None:
        lam = top_eigen(op, **kw).lambda_max + shift
    else:
        lam = top_eigen(ShiftedOperator(op, decay), **kw).lambda_max
    return lam / stab.threshold


def dense_ratio(a: torch.Tensor, p: torch.Tensor, d: torch.Tensor, threshold: float) -> float:
    s = p.rsqrt()
    return (
        float(torch.linalg.eigvalsh(s[:, None] * (a + torch.diag(d)) * s[None, :])[-1]) / threshold
    )


def _scale_for(
    a: torch.Tensor, p: torch.Tensor, d: torch.Tensor, thr: float, target: float
) -> float:
    """``c`` with ``dense_ratio(c·A) = target`` (bisection; the ratio grows with ``c``)."""
    lo, hi = 0.0, 1.0
    assert dense_ratio(0 * a, p, d, thr) < target
    while dense_ratio(hi * a, p, d, thr) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dense_ratio(mid * a, p, d, thr) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _run(
    opt: torch.optim.Optimizer, xs: list[torch.nn.Parameter], a: torch.Tensor, steps: int
) -> tuple[list[float], Stability | None]:
    """Full-batch steps on ``½ θᵀAθ``; ‖θ‖_∞ after each, and ``stability_of`` at step 400
    (past Adam's bias-correction transient, before divergent iterates grow enough to move
    ``P``)."""
    norms, snapshot = [], None
    for step in range(steps):
        g = a @ torch.cat([x.detach() for x in xs])
        xs[0].grad, xs[1].grad = g[:N].clone(), g[N:].clone()
        opt.step()
        norms.append(max(float(x.detach().abs().max()) for x in xs))
        if step == 400:
            snapshot = stability_of(opt, xs)
    return norms, snapshot


# name -> (make(groups), frozen P, H-space decay of a group with weight_decay wd, start scale)
Make = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
EPS = 1e6
ROWS: dict[str, tuple[Make, float, Callable[[float], float], float]] = {
    "sgd": (lambda g: torch.optim.SGD(g, lr=0.1), 1.0, lambda wd: wd, 1.0),
    "sgd_momentum": (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), 1.0, lambda wd: wd, 1.0),
    "sgd_nesterov": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
        1.0,
        lambda wd: wd,
        1.0,
    ),
    "rsg": (lambda g: RSG(g, lr=0.1, beta=0.9, observation=0.2), 1.0, lambda wd: wd, 1.0),
    "adam": (
        lambda g: torch.optim.Adam(g, lr=1.0, betas=(0.9, 0.999), eps=EPS),
        EPS,
        lambda wd: wd,
        1e-200,
    ),
    "arsg_amsgrad": (  # v̂_0 = ε = 1e12 floors v: P = √ε = 1e6
        lambda g: ARSG(g, lr=1.0, betas=(0.9, 0.999), observation=0.1, eps=EPS**2),
        EPS,
        lambda wd: wd,
        1e-200,
    ),
    "novograd": (  # decay on the normalised gradient: D = d·P
        lambda g: NovoGrad(g, lr=1.0, betas=(0.9, 0.9), eps=EPS),
        EPS,
        lambda wd: wd * EPS,
        1e-200,
    ),
}


@pytest.mark.parametrize("factor", [0.97, 1.03])
@pytest.mark.parametrize("row", sorted(ROWS))
def test_coupled_decay_row_stable_below_unstable_above(row: str, factor: float) -> None:
    make, p_frozen, h_decay, scale = ROWS[row]
    xs = _start(scale)
    probe = make([{"params": [xs[0]]}, {"params": [xs[1]]}])
    thr = stability_of(probe, xs)
    assert thr is not None
    # group decays whose P-space shifts D/P are 0.15 and 0.6 of the threshold
    wds = [f * thr.threshold * p_frozen / h_decay(1.0) for f in (0.15, 0.6)]
    opt = make(
        [{"params": [xs[0]], "weight_decay": wds[0]}, {"params": [xs[1]], "weight_decay": wds[1]}]
    )
    p = torch.full((2 * N,), p_frozen, dtype=DT)
    d = torch.cat([torch.full((N,), h_decay(w), dtype=DT) for w in wds])
    a = _scale_for(_spd(), p, d, thr.threshold, factor) * _spd()
    if factor > 1.0:  # what ignoring the decay, or one group's decay for all, would say
        assert dense_ratio(a, p, 0 * d, thr.threshold) < 0.8
        assert dense_ratio(a, p, torch.full_like(d, float(d[0])), thr.threshold) < 0.97
    start = float(torch.cat([x.detach() for x in xs]).abs().max())
    norms, st = _run(opt, xs, a, 1500)
    _assert_verdict(norms, start, factor)

    assert st is not None and st.coupled_decay is not None
    got = torch.cat([c.reshape(-1) for c in st.coupled_decay])
    torch.testing.assert_close(got, d, rtol=1e-12, atol=0.0)
    if st.preconditioner is not None:  # the frozen P
        torch.testing.assert_close(torch.cat(st.preconditioner), p, rtol=1e-12, atol=0.0)
    assert callback_ratio(st, a) == pytest.approx(factor, rel=1e-9)


@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_adamw_decoupled_decay_is_left_out(factor: float) -> None:
    """AdamW: no ``D``; the ratio is the bare one. With ``P`` frozen the true edge is
    ``threshold·(1 − η·wd/2)`` (module doc): with ``η·wd = 0.2`` here, 0.9 of the threshold —
    the left-out decoupled decay makes the bare ratio read low, by ``η·wd/2``."""
    lr, wd, beta1 = 1.0, 0.2, 0.9
    start = 1e-200 * (torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=DT) + 0.5)
    x = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([x], lr=lr, betas=(beta1, 0.999), eps=EPS, weight_decay=wd)
    st = stability_of(opt, [x])
    assert st is not None and st.coupled_decay is None and "decoupled" in st.rule
    edge = st.threshold * (1 - lr * wd / 2)
    lam = factor * edge * EPS * torch.tensor([1.0, 0.6, 0.2, 0.05], dtype=DT)
    norms = []
    for _ in range(1500):
        x.grad = lam * x.detach()
        opt.step()
        norms.append(float(x.detach().abs().max()))
    _assert_verdict(norms, float(start.abs().max()), factor)
    st = stability_of(opt, [x])
    assert st is not None and st.coupled_decay is None and st.preconditioner is not None
    ratio = callback_ratio(st, torch.diag(lam))
    assert ratio == pytest.approx(factor * (1 - lr * wd / 2), rel=1e-9)  # the bare ratio


def test_classification_of_each_optimizer() -> None:
    """Which decay enters ``D`` (coupled) and which does not (decoupled); 0 where frozen."""
    x, frozen, stranger = (torch.nn.Parameter(torch.ones(3, dtype=DT)) for _ in range(3))

    def groups() -> list[dict[str, Any]]:  # fresh dicts: optimizers fill in their defaults
        return [
            {"params": [x], "weight_decay": 0.25},
            {"params": [frozen], "lr": 0.0, "weight_decay": 0.5},
        ]

    def decay(opt: torch.optim.Optimizer) -> list[float] | None:
        st = stability_of(opt, [x, frozen, stranger])
        assert st is not None
        if st.coupled_decay is None:
            return None
        assert [c.shape for c in st.coupled_decay] == [torch.Size([3])] * 3
        return [float(c.reshape(-1)[0]) for c in st.coupled_decay]

    coupled = [
        torch.optim.SGD(groups(), lr=0.1),
        torch.optim.SGD(groups(), lr=0.1, momentum=0.9, nesterov=True),
        torch.optim.SGD(groups(), lr=0.1, momentum=0.9, dampening=0.5),
        torch.optim.Adam(groups(), lr=0.1),
        RSG(groups(), lr=0.1),
        ARSG(groups(), lr=0.1),
    ]
    for opt in coupled:
        assert decay(opt) == [0.25, 0.0, 0.0], type(opt)
    for opt in (
        torch.optim.AdamW(groups(), lr=0.1),
        torch.optim.Adam(groups(), decoupled_weight_decay=True),
    ):
        assert decay(opt) is None
    for opt in (
        torch.optim.SGD([x], lr=0.1),
        torch.optim.Adam([x]),
        RSG([x], lr=0.1),
        NovoGrad([x]),
    ):
        st = stability_of(opt, [x])
        assert st is not None and st.coupled_decay is None  # no decay at all

    # NovoGrad: D = d·P (per tensor), only once P exists
    nov = NovoGrad(groups(), lr=0.1, eps=1e-3)
    assert decay(nov) is None  # before the first step P (and D) are not available
    x.grad = torch.full_like(x, 2.0)
    nov.step()
    p_x = math.sqrt(12.0) + 1e-3
    assert decay(nov) == pytest.approx([0.25 * p_x, 0.0, 0.0], rel=1e-12)
    # a per-group lr: D stays d·P_raw, the preconditioned shift D/P is d·η_g/η_ref
    y = torch.nn.Parameter(torch.ones(2, dtype=DT))
    nov = NovoGrad([{"params": [y]}, {"params": [x], "lr": 0.05}], lr=0.1, weight_decay=0.4)
    x.grad, y.grad = torch.full_like(x, 2.0), torch.ones_like(y)
    nov.step()
    st = stability_of(nov, [y, x])
    assert st is not None and st.coupled_decay is not None and st.preconditioner is not None
    shifts = [float((c / p).reshape(-1)[0]) for c, p in zip(st.coupled_decay, st.preconditioner)]
    assert shifts == pytest.approx([0.4, 0.4 * 0.05 / 0.1], rel=1e-12)


def test_shifted_operator_and_helpers() -> None:
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(6, 6, generator=gen, dtype=DT)
    h = m + m.T
    op = LambdaOperator(lambda v: h @ v, size=6, dtype=DT)
    d = torch.rand(6, generator=gen, dtype=DT)
    v = torch.randn(6, generator=gen, dtype=DT)
    torch.testing.assert_close(
        ShiftedOperator(op, d).matvec(v), h @ v + d * v, rtol=1e-14, atol=1e-14
    )
    p = torch.rand(6, generator=gen, dtype=DT) + 0.1
    s = p.rsqrt()
    dense = s[:, None] * (h + torch.diag(d)) * s[None, :]
    torch.testing.assert_close(
        shifted_preconditioned(op, d, p).matvec(v), dense @ v, rtol=1e-12, atol=1e-12
    )
    mat = shifted_preconditioned(op, d, lambda u: s * u)  # S given as a map
    torch.testing.assert_close(mat.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        shifted_preconditioned(op, None, p).matvec(v), (s[:, None] * h * s[None, :]) @ v
    )
    # D = c·I shifts every eigenvalue by c
    est = top_eigen(ShiftedOperator(op, torch.full((6,), 0.3, dtype=DT)), max_iter=6, tol=1e-12)
    assert est.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]) + 0.3, rel=1e-12)
    assert constant_shift(torch.full((6,), 0.3, dtype=DT)) == 0.3 and constant_shift(d) is None

    parts = [torch.zeros(2, 2, dtype=DT), torch.full((), 0.1, dtype=DT).expand(2)]
    assert decay_vector(None, op) is None and decay_vector([torch.zeros(6, dtype=DT)], op) is None
    with pytest.raises(ValueError, match=r"`decay` must have shape \(6,\), got \(4,\)"):
        decay_vector([torch.ones(4, dtype=DT)], op)
    assert (
        decay_vector(
            parts + [torch.ones(0, dtype=DT)], LambdaOperator(lambda u: u, size=6, dtype=DT)
        )
        is not None
    )
    with pytest.raises(ValueError, match="`decay` must hold one tensor per parameter"):
        decay_vector([], op)
    with pytest.raises(ValueError, match=r"`diagonal` must have shape \(6,\), got \(5,\)"):
        ShiftedOperator(op, torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match="`diagonal` must be finite"):
        ShiftedOperator(op, torch.full((6,), math.inf, dtype=DT))
    with pytest.raises(ValueError, match="`diagonal` must be a tensor, got 0.5"):
        ShiftedOperator(op, 0.5)  # type: ignore[arg-type]
