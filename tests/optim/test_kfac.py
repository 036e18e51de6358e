"""K-FAC preconditioner against explicit float64 Kronecker computations (docs/theory/kfac.md §Kronecker factors).

Factors and preconditioned gradients of Linear (with in-place ReLU) and Conv2d layers against
per-example loops and dense solves; 1×1 conv = Linear; batch-size and mean/sum invariance;
π damping; KL clipping and lr sync; one step onto the least-squares solution; accumulation =
big batch; running averages and cadences; schedules. Behaviour (recording, AMP, skipping,
resume, arguments) is in ``test_kfac_behaviour.py``, stability in ``test_kfac_stability.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.kfac.factors import apply_damped, eigen, pi_factor

from .kfac_reference import (
    DT,
    conv_factors,
    exact_solve,
    grad_matrix,
    linear_factors,
    pi_solve,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)


def _data(n: int = 12, d: int = 3, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=DT), torch.randint(
        0, classes, (n,), generator=gen
    )


def _mlp(bias: bool = True, inplace: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 4, bias=bias), nn.ReLU(inplace=inplace), nn.Linear(4, 3, bias=bias)
    ).double()


def _pre(model: nn.Module, **kw: Any) -> KFACPreconditioner:
    defaults: dict[str, Any] = dict(factor_update_every=1, inverse_update_every=1, kl_clip=None)
    defaults.update(kw)
    return KFACPreconditioner(model, **defaults)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
    (F.cross_entropy(model(x), y) * scale).backward()


# ------------------------------------------------------------------ factors and solves
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_linear_factors_and_step_match_kronecker(bias: bool, inplace: bool) -> None:
    model, (x, y) = _mlp(bias, inplace), _data()
    pre = _pre(model, damping=0.1)
    _backward(model, x, y)
    grads = {name: grad_matrix(model[i]).clone() for i, name in ((0, "0"), (2, "2"))}
    pre.step()
    reference = _mlp(bias, inplace=False)  # same weights; the reference needs ∂ℓ/∂(pre-ReLU)
    for i, name in ((0, "0"), (2, "2")):
        a, g = linear_factors(reference, reference[i], x, y)
        got_a, got_g = pre.factors()[name]
        torch.testing.assert_close(got_a, a, **TIGHT)
        torch.testing.assert_close(got_g, g, **TIGHT)
        torch.testing.assert_close(
            grad_matrix(model[i]), exact_solve(a, g, grads[name], 0.1), **TIGHT
        )


CONVS = {
    "pad1": dict(kernel_size=3, padding=1),
    "stride2_reflect": dict(kernel_size=3, padding=1, stride=2, padding_mode="reflect"),
    "dilation2_nobias": dict(kernel_size=2, dilation=2, bias=False),
    "same": dict(kernel_size=(3, 2), padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # (3, 2) kernel: asymmetric padding
@pytest.mark.parametrize("conv_kw", CONVS.values(), ids=CONVS.keys())
def test_conv_factors_and_step_match_kfac_expand(conv_kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **conv_kw)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(5, 2, 5, 5, generator=gen, dtype=DT),
        torch.randint(0, 3, (5,), generator=gen),
    )
    model(x)  # materialise the lazy layer
    pre = _pre(model, damping=0.05)
    _backward(model, x, y)
    grads = [grad_matrix(model[i]).clone() for i in (0, 3)]
    pre.step()
    reference = copy.deepcopy(model)
    for i, (a, g) in ((0, conv_factors(reference, reference[0], x, y)),
                      (3, linear_factors(reference, reference[3], x, y))):  # fmt: skip
        got_a, got_g = pre.factors()[str(i)]
        torch.testing.assert_close(got_a, a, **TIGHT)
        torch.testing.assert_close(got_g, g, **TIGHT)
        want = exact_solve(a, g, grads[0 if i == 0 else 1], 0.05)
        torch.testing.assert_close(grad_matrix(model[i]), want, **TIGHT)


def test_one_by_one_conv_on_one_pixel_is_the_linear_case() -> None:
    lin = _mlp()
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.Flatten()).double()
    with torch.no_grad():
        for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
            c.weight.copy_(li.weight[:, :, None, None])
            c.bias.copy_(li.bias)
    x, y = _data()
    pres = [_pre(lin, damping=0.01), _pre(conv, damping=0.01)]
    _backward(lin, x, y)
    _backward(conv, x[:, :, None, None], y)
    for p in pres:
        p.step()
    for name in ("0", "2"):
        for got, want in zip(pres[1].factors()[name], pres[0].factors()[name]):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    for pc, pl in zip(conv.parameters(), lin.parameters()):
        torch.testing.assert_close(pc.grad.reshape(pl.shape), pl.grad, rtol=1e-11, atol=1e-14)


def test_factors_do_not_depend_on_batch_size_or_reduction() -> None:
    x, y = _data(8)
    runs = {}
    for label, xs, ys, reduction in (
        ("mean", x, y, "mean"),
        ("mean_twice", torch.cat([x, x]), torch.cat([y, y]), "mean"),
        ("sum", x, y, "sum"),
    ):
        model = _mlp()
        pre = _pre(model, damping=0.1, loss_reduction=reduction)
        F.cross_entropy(model(xs), ys, reduction=reduction).backward()
        pre.step()
        runs[label] = (pre.factors(), [p.grad.clone() for p in model.parameters()])
    for label in ("mean_twice", "sum"):
        for name in ("0", "2"):
            for got, want in zip(runs[label][0][name], runs["mean"][0][name]):
                torch.testing.assert_close(got, want, **TIGHT)
    # same data: same mean gradient and same step; the sum loss's gradient (and step) is N×
    for got, want in zip(runs["mean_twice"][1], runs["mean"][1]):
        torch.testing.assert_close(got, want, **TIGHT)
    for got, want in zip(runs["sum"][1], runs["mean"][1]):
        torch.testing.assert_close(got, 8 * want, **TIGHT)
    # the test can fail: without undoing the mean, G would be 1/N² of the per-example factor
    assert not torch.allclose(runs["sum"][0]["2"][1] / 64, runs["mean"][0]["2"][1])


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 2, generator=gen, dtype=DT)
    return m @ m.T / n


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_exact_and_pi_damping_match_their_formulas(damping: float) -> None:
    a, g = _spd(5, 0), 7.0 * _spd(3, 1)
    m = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    ea, eg = eigen(a), eigen(g)
    got = apply_damped(m, ea, eg, damping, mode="exact")
    torch.testing.assert_close(got, exact_solve(a, g, m, damping), **TIGHT)
    pi = pi_factor(ea[0], eg[0])
    assert pi == pytest.approx(math.sqrt((a.trace() / 5) / (g.trace() / 3)), rel=1e-12)
    got = apply_damped(m, ea, eg, damping, mode="pi", pi=pi)
    torch.testing.assert_close(got, pi_solve(a, g, m, damping), **TIGHT)
    assert not torch.allclose(got, exact_solve(a, g, m, damping), rtol=1e-3)


def test_pi_mode_step_matches_formula() -> None:
    model, (x, y) = _mlp(), _data()
    pre = _pre(model, damping=0.2, damping_mode="pi")
    _backward(model, x, y)
    m = grad_matrix(model[2]).clone()
    pre.step()
    a, g = pre.factors()["2"]
    torch.testing.assert_close(grad_matrix(model[2]), pi_solve(a, g, m, 0.2), **TIGHT)


# ------------------------------------------------------------------ KL clipping and lr
def test_kl_clip_formula_and_lr_follows_the_optimizer() -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    kappa = 1e-4
    pre = _pre(model, damping=0.1, kl_clip=kappa, optimizer=opt)
    free = _pre(copy.deepcopy(model), damping=0.1)  # the same step without clipping
    for step in range(3):
        for m in (model, free.model):
            m.zero_grad()
            _backward(m, x, y)
        grads = [p.grad.clone() for p in model.parameters()]
        pre.step()
        free.step()
        deltas = [p.grad.clone() for p in free.model.parameters()]
        eta = 0.5 * 0.1**step  # the scheduler's lr at this step, never copied by hand
        vg = sum(float((d * g).sum()) for d, g in zip(deltas, grads))
        nu = min(1.0, math.sqrt(kappa / (eta**2 * vg)))
        assert pre.info.kl_scale == pytest.approx(nu, rel=1e-12)
        for p, d in zip(model.parameters(), deltas):
            torch.testing.assert_close(p.grad, nu * d, **TIGHT)
        opt.step()
        free.model.load_state_dict(model.state_dict())
        sched.step()
    assert pre.info.kl_scale == 1.0  # lr 0.005: the clip no longer binds
    nus = []
    for lr in (0.5, lambda step: 0.5):  # lr= (number or schedule) instead of the optimizer
        model.zero_grad()
        p2 = _pre(model, damping=0.1, kl_clip=kappa, lr=lr)
        _backward(model, x, y)
        p2.step()
        p2.remove()
        nus.append(p2.info.kl_scale)
    assert nus[0] == nus[1] < 1.0


# ------------------------------------------------------------------ exact oracles
def test_one_step_lands_on_least_squares() -> None:
    """Empirical-Fisher G = I by construction (residuals with (1/N) Σ r rᵀ = I): one step with
    λ → 0 and lr = 1 is Newton's step on ½‖Wā − y‖², i.e. the least-squares solution."""
    n, d_in, d_out = 10, 3, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen, dtype=DT)
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out).double()
    q, _ = torch.linalg.qr(torch.randn(n, d_out, generator=gen, dtype=DT))
    with torch.no_grad():
        y = layer(x) - math.sqrt(n) * q  # residuals r_n = √N q_n
    pre = _pre(layer, damping=1e-12)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    (0.5 * ((layer(x) - y) ** 2).sum(1).mean()).backward()
    pre.step()
    opt.step()
    torch.testing.assert_close(pre.factors()[""][1], torch.eye(d_out, dtype=DT), **TIGHT)
    ones = torch.ones(n, 1, dtype=DT)
    solution = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution.T
    got = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    torch.testing.assert_close(got, solution, rtol=1e-8, atol=1e-9)


def test_accumulation_equals_the_big_batch() -> None:
    x, y = _data(12)
    big, acc = _mlp(), _mlp()
    p_big, p_acc = _pre(big, damping=0.1), _pre(acc, damping=0.1)
    _backward(big, x, y)
    for sl in (slice(0, 5), slice(5, 12)):  # unequal micro-batches, each a mean over the step
        (F.cross_entropy(acc(x[sl]), y[sl], reduction="sum") / 12).backward()
    p_big.step()
    p_acc.step()
    for name in ("0", "2"):
        for got, want in zip(p_acc.factors()[name], p_big.factors()[name]):
            torch.testing.assert_close(got, want, **TIGHT)
    for pa, pb in zip(acc.parameters(), big.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TIGHT)


def test_running_averages_and_cadences() -> None:
    model = _mlp()
    pre = _pre(model, factor_update_every=2, inverse_update_every=3, factor_decay=0.7)
    batches = [_data(6, seed=s) for s in range(7)]
    singles = []
    for x, y in batches:  # what each batch alone would give
        single = _pre(copy.deepcopy(model))
        _backward(single.model, x, y)
        single.step()
        singles.append(single.factors()["0"])
    events = []
    for x, y in batches:
        model.zero_grad()
        _backward(model, x, y)
        pre.step()
        events.append((pre.info.factors_updated, pre.info.inverses_updated))
    assert events == [(True, True), (False, False), (True, False), (False, True),
                      (True, False), (False, False), (True, True)]  # fmt: skip
    want_a = singles[0][0]
    for k in (2, 4, 6):  # F ← ξF + (1−ξ)F_batch from the first batch on; odd steps unrecorded
        want_a = 0.7 * want_a + 0.3 * singles[k][0]
    torch.testing.assert_close(pre.factors()["0"][0], want_a, **TIGHT)
    # the eigenbasis in use is the one of step 6's factors
    d_a, q_a = pre.layers["0"].eigen_a  # type: ignore[misc]
    torch.testing.assert_close(q_a @ torch.diag(d_a) @ q_a.T, want_a, **TIGHT)


def test_schedules_are_evaluated_at_the_step() -> None:
    model, (x, y) = _mlp(), _data()
    pre = _pre(model, damping=lambda k: 0.1 * (k + 1), factor_decay=lambda k: 0.5)
    for _ in range(3):
        model.zero_grad()
        _backward(model, x, y)
        pre.step()
    assert pre.info.damping == pytest.approx(0.3)
    bad = _pre(_mlp(), damping=lambda k: -1.0)
    _backward(bad.model, x, y)
    with pytest.raises(ValueError, match=r"`damping`.*-1\.0.*step 0"):
        bad.step()


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding=1),
        dict(padding=(1, 2)),
        dict(padding="same", dilation=(1, 2)),
        dict(padding="same"),
        dict(padding="valid"),
        dict(padding=(0, 3), dilation=2),
    ],
)
@pytest.mark.parametrize("kernel", [3, (2, 4), (4, 5)])
def test_conv_padding_is_the_padding_the_convolution_applies(kw, kernel):
    from lightning_landscape.optim.kfac.factors import conv_padding

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, kernel, bias=False, **kw).double()
    x = torch.randn(2, 2, 9, 10, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, conv_padding(conv))
    expected = torch.nn.functional.conv2d(padded, conv.weight, dilation=conv.dilation)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)
