"""Exact references in float64 for the package's optimizers (part of the conformance suite).

The published special cases against torch.optim (RSG = SGD heavy ball / Nesterov / plain,
ARSG Adam mode = Adam, and = constant-momentum NAdam once the bias corrections vanish), the
update equations of the RSG/ARSG and NovoGrad docstrings (docs/api/optim.md) written out in
plain tensor algebra, and torch-optimizer's NovoGrad. The table-driven conventions are in ``test_optimizers.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from lightning_landscape.optim import ARSG, RSG, NovoGrad

from .test_optimizers import DT, _close, _data, _grads, _net, _train


# ------------------------------------------------------------------ exact special cases
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("mu", "sgd_kwargs"),
    [(0.0, {}), ("1-beta", {"nesterov": True}), (1.0, {"momentum": 0.0})],
    ids=["heavy_ball", "nesterov", "plain"],
)
def test_rsg_special_cases_are_sgd(mu: Any, sgd_kwargs: dict[str, Any], foreach: bool) -> None:
    beta, lr, wd = 0.8, 0.3, 0.01
    mu = 1 - beta if mu == "1-beta" else mu
    ps = _net()
    ours = _train(
        RSG(ps, lr=lr, beta=beta, observation=mu, weight_decay=wd, foreach=foreach), ps, 30
    )
    ps = _net()
    kw = {"momentum": beta, **sgd_kwargs}
    ref = _train(
        torch.optim.SGD(ps, lr=lr if mu == 1.0 else lr * (1 - beta), weight_decay=wd, **kw), ps, 30
    )  # type: ignore[arg-type]
    _close(ours, ref)


@pytest.mark.parametrize("foreach", [False, True])
def test_arsg_adam_mode_with_mu_zero_is_adam(foreach: bool) -> None:
    kw = {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01}
    ps = _net()
    ours = _train(ARSG(ps, observation=0.0, amsgrad=False, foreach=foreach, **kw), ps, 30)  # type: ignore[arg-type]
    ps = _net()
    _close(ours, _train(torch.optim.Adam(ps, **kw), ps, 30))  # type: ignore[arg-type]


def _arsg_reference(ps: Sequence[torch.Tensor], steps: int, *, lr: float, b1: float, b2: float,
                    mu: float, eps: float, wd: float, amsgrad: bool) -> list[Any]:  # fmt: skip
    """The ARSG docstring's equations written out (the MXNet reference for the AMSGrad mode)."""
    x, y = _data()
    th = [p.detach().clone() for p in ps]
    m = [torch.zeros_like(t) for t in th]
    v = [torch.zeros_like(t) for t in th]
    vhat = [torch.full_like(t, eps) for t in th]
    out = []
    for t in range(1, steps + 1):
        gs = [g + wd * p for g, p in zip(_grads(th, x, y), th)]
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if amsgrad:
                vhat[i] = torch.maximum(vhat[i], v[i])
                th[i] = th[i] - lr * ((1 - mu) * m[i] + mu * g) / vhat[i].sqrt()
            else:
                den = (v[i] / (1 - b2**t)).sqrt() + eps
                th[i] = th[i] - lr * ((1 - mu) * m[i] / (1 - b1**t) + mu * g) / den
        out.append([t_.clone() for t_ in th])
    return out


@pytest.mark.parametrize("amsgrad", [True, False])
def test_arsg_matches_its_equations(amsgrad: bool) -> None:
    kw = {"lr": 0.01, "mu": 0.1, "eps": 1e-3, "wd": 0.01, "amsgrad": amsgrad}
    ps = _net()
    ref = _arsg_reference(ps, 30, b1=0.9, b2=0.99, **kw)  # type: ignore[arg-type]
    opt = ARSG(ps, lr=0.01, betas=(0.9, 0.99), observation=0.1, eps=1e-3, weight_decay=0.01,
               amsgrad=amsgrad)  # fmt: skip
    _close(_train(opt, ps, 30), ref)


def test_arsg_adam_mode_with_mu_one_minus_beta1_is_constant_momentum_nadam() -> None:
    """Exact against the equations at every step (μ = 1−β1), and equal to torch's NAdam with
    constant momentum β1 (``momentum_decay`` huge: 0.96**(t·ψ) = 0) once β1^t < 2^-53.

    Before that the two differ by design: NAdam corrects g by 1/(1−β1^t) and m by
    1/(1−β1^(t+1)), ARSG corrects m by 1/(1−β1^t) only (both exact implementations of their
    own formula), so the state is transplanted at t = 60 (β1 = 0.5: β1^60 ≈ 9e-19).
    """
    b1, b2, lr = 0.5, 0.9, 0.01
    ps = _net()
    ref = _arsg_reference(ps, 80, lr=lr, b1=b1, b2=b2, mu=1 - b1, eps=1e-8, wd=0.0, amsgrad=False)
    opt = ARSG(ps, lr=lr, betas=(b1, b2), observation=1 - b1, amsgrad=False)
    ours = _train(opt, ps, 60)
    _close(ours, ref[:60])
    nadam_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    nadam = torch.optim.NAdam(nadam_ps, lr=lr, betas=(b1, b2), momentum_decay=1e9)
    for p, q in zip(ps, nadam_ps):
        s = opt.state[p]
        nadam.state[q] = {"step": torch.tensor(60.0), "mu_product": torch.tensor(b1**60, dtype=DT),
                          "exp_avg": s["exp_avg"].clone(), "exp_avg_sq": s["exp_avg_sq"].clone()}  # fmt: skip
    ours = _train(opt, ps, 20)
    _close(ours, ref[60:])
    _close(ours, _train(nadam, nadam_ps, 20))
    # the early steps really differ: from the same start, NAdam's first step is not ARSG's
    a, b = _net(), _net()
    first = _train(ARSG(a, lr=lr, betas=(b1, b2), observation=1 - b1, amsgrad=False), a, 1)
    other = _train(torch.optim.NAdam(b, lr=lr, betas=(b1, b2), momentum_decay=1e9), b, 1)
    assert not torch.allclose(first[0][0], other[0][0], rtol=1e-6, atol=0)


def _novograd_reference(ps: Sequence[torch.Tensor], steps: int, *, lr: float, b1: float, b2: float,
                        eps: float, wd: float, avg: bool, ams: bool, maximize: bool) -> list[Any]:  # fmt: skip
    """The equations of the NovoGrad docstring, one tensor = one layer."""
    x, y = _data()
    th = [p.detach().clone() for p in ps]
    m = [torch.zeros_like(t) for t in th]
    v: list[torch.Tensor] = [torch.zeros((), dtype=DT)] * len(th)
    vmax = list(v)
    out = []
    for t in range(1, steps + 1):
        gs = _grads(th, x, y)
        for i, g in enumerate(gs):
            g = -g if maximize else g
            norm2 = (g * g).sum()
            v[i] = norm2 if t == 1 else b2 * v[i] + (1 - b2) * norm2
            vmax[i] = torch.maximum(vmax[i], v[i])
            d = g / ((vmax[i] if ams else v[i]).sqrt() + eps) + wd * th[i]
            m[i] = b1 * m[i] + ((1 - b1) * d if avg else d)
            th[i] = th[i] - lr * m[i]
        out.append([t_.clone() for t_ in th])
    return out


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_novograd_matches_its_equations(avg: bool, amsgrad: bool) -> None:
    kw: dict[str, Any] = {"lr": 0.05, "eps": 1e-8}
    ps = _net()
    ref = _novograd_reference(ps, 25, b1=0.9, b2=0.7, wd=0.01, avg=avg, ams=amsgrad,
                              maximize=False, **kw)  # fmt: skip
    opt = NovoGrad(
        ps, betas=(0.9, 0.7), weight_decay=0.01, grad_averaging=avg, amsgrad=amsgrad, **kw
    )
    _close(_train(opt, ps, 25), ref)
    # maximize: the reference negates g only (weight decay keeps its sign)
    ps = _net()
    ref = _novograd_reference(ps, 10, b1=0.9, b2=0.7, wd=0.01, avg=avg, ams=amsgrad,
                              maximize=True, **kw)  # fmt: skip
    opt = NovoGrad(ps, betas=(0.9, 0.7), weight_decay=0.01, grad_averaging=avg, amsgrad=amsgrad,
                   maximize=True, **kw)  # fmt: skip
    _close(_train(opt, ps, 10), ref)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_novograd_matches_torch_optimizer(avg: bool, amsgrad: bool) -> None:
    """Same first-step convention (m_0 = 0, v_1 = ‖g_1‖², (1−β1) from step 1 if averaging)."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    kw: dict[str, Any] = {"lr": 0.05, "eps": 1e-8}
    ps = _net()
    ours = _train(NovoGrad(ps, betas=(0.9, 0.7), weight_decay=0.01, grad_averaging=avg,
                           amsgrad=amsgrad, **kw), ps, 25)  # fmt: skip
    ps = _net()
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # its scalar v is torch.zeros([]) in the default dtype
    try:
        theirs = torch_optimizer.NovoGrad(ps, betas=(0.9, 0.7), weight_decay=0.01,
                                          grad_averaging=avg, amsgrad=amsgrad, **kw)  # fmt: skip
        x, y = _data()
        ref = []
        for _ in range(25):
            for p, g in zip(ps, _grads(ps, x, y)):
                p.grad = g  # it divides p.grad in place
            theirs.step()
            ref.append([p.detach().clone() for p in ps])
    finally:
        torch.set_default_dtype(before)
    _close(ours, ref)
