"""The K-FAC stability rule: P^{-1/2} and λ_max(P^{-1/2} H P^{-1/2}) against dense references.

``P`` is assembled densely from the factors with ``torch.kron`` (row-major ``[W | b]``, permuted
to the parameters' flat order) and ``H`` is the exact float64 Hessian; the threshold is the
base optimizer's divided by the last KL scale. Diagonally preconditioned base optimizers have
no rule; a K-FAC run on the quadratic model is stable below the threshold and diverges above.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.measures.operators import ProbeHessian, flatten, unflatten
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.sharpness import preconditioned_lambda_max
from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.stability import stability_of

from .kfac_reference import DT, dense_preconditioner, sym_inverse_sqrt
from .test_kfac import _data, _mlp


def _trained(
    mode: str, kl_clip: float | None
) -> tuple[nn.Module, KFACPreconditioner, torch.optim.Optimizer]:
    model, (x, y) = _mlp(), _data(12)
    extra = nn.Parameter(torch.ones(2, dtype=DT))  # an unregistered parameter: P = I there
    model.register_parameter("extra", extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pre = KFACPreconditioner(
        model, optimizer=opt, damping=0.05, damping_mode=mode, kl_clip=kl_clip,
        factor_update_every=1, inverse_update_every=2,
    )  # fmt: skip
    for _ in range(3):
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + (extra**2).sum()).backward()
        pre.step()
        opt.step()
    return model, pre, opt


@pytest.mark.parametrize(("mode", "kl_clip"), [("exact", 1e-3), ("pi", None)])
def test_preconditioned_sharpness_equals_dense_reference(mode: str, kl_clip: float | None) -> None:
    model, pre, opt = _trained(mode, kl_clip)
    params = list(model.parameters())
    stab = stability_of(opt, params)
    assert stab is not None and stab.preconditioned and stab.preconditioner is None
    nu = pre.kl_scale
    assert (nu < 1.0) == (kl_clip is not None)
    assert stab.threshold == pytest.approx((2 + 2 * 0.9) / 0.5 / nu, rel=1e-12)
    assert "K-FAC" in stab.rule
    p_dense = dense_preconditioner(pre, params)
    s_dense = sym_inverse_sqrt(p_dense)
    v = torch.randn(p_dense.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    got = flatten(stab.inverse_sqrt(unflatten(v, params)))  # type: ignore[misc]
    torch.testing.assert_close(got, s_dense @ v, rtol=1e-10, atol=1e-12)
    # λ_max(P^-1/2 H P^-1/2) on a probe, by Lanczos through the callable vs dense eigvalsh
    x, y = _data(9, seed=4)

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + (m.extra**2).sum()

    op = ProbeHessian(model, Probe.from_samples((x, y), batch_size=4), loss_fn)
    flat0 = flatten([p.detach() for p in params])

    def f(flat: torch.Tensor) -> torch.Tensor:
        named = {n: t for (n, _), t in zip(model.named_parameters(), unflatten(flat, params))}
        return loss_fn(_Call(model, named), (x, y))

    h = torch.autograd.functional.hessian(f, flat0)
    want = torch.linalg.eigvalsh(s_dense @ h @ s_dense)[-1]
    inv_sqrt = stab.inverse_sqrt
    est = preconditioned_lambda_max(
        op,
        lambda u: flatten(inv_sqrt(unflatten(u, params))),
        tol=1e-12,
        max_iter=h.shape[0],  # type: ignore[misc]
    )
    assert est.lambda_max == pytest.approx(float(want), rel=1e-9)
    assert est.lambda_max != pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-2)


class _Call(nn.Module):
    """``model`` evaluated with substituted parameters (for the dense Hessian)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.params = model, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.func.functional_call(self.inner, self.params, (x,))

    @property
    def extra(self) -> torch.Tensor:
        return self.params["extra"]


def test_rules_for_other_base_optimizers() -> None:
    model, (x, y) = _mlp(), _data()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    pre = KFACPreconditioner(model, optimizer=adam, factor_update_every=1)
    params = list(model.parameters())
    assert stability_of(adam, params) is None  # Adam: P_base not available yet
    F.cross_entropy(model(x), y).backward()
    pre.step()
    adam.step()
    assert stability_of(adam, params) is None  # Adam's diagonal P: no single threshold
    # per-layer lr groups fold into P; the first step makes P available
    model2 = _mlp()
    groups = [{"params": model2[0].parameters(), "lr": 0.1}, {"params": model2[2].parameters()}]
    sgd = torch.optim.SGD(groups, lr=0.4)
    pre2 = KFACPreconditioner(model2, optimizer=sgd, factor_update_every=1, kl_clip=None)
    params2 = list(model2.parameters())
    early = stability_of(sgd, params2)
    assert early is not None and early.inverse_sqrt is None and early.preconditioned
    F.cross_entropy(model2(x), y).backward()
    pre2.step()
    st = stability_of(sgd, params2)
    assert st is not None and st.threshold == pytest.approx(2 / 0.1)
    vs = [torch.ones_like(p) for p in params2]
    plain = pre2.inverse_sqrt(params2, vs)
    for i, (got, want) in enumerate(zip(st.inverse_sqrt(vs), plain)):  # type: ignore[misc]
        torch.testing.assert_close(got, want / math.sqrt(1.0 if i < 2 else 0.1 / 0.4))  # η_ref/η_g
    # weight and bias of one layer in groups with different lrs: no rule
    model3 = _mlp()
    split = [{"params": [model3[0].weight], "lr": 0.1}, {"params": [p for n, p in
             model3.named_parameters() if n != "0.weight"]}]  # fmt: skip
    sgd3 = torch.optim.SGD(split, lr=0.4)
    KFACPreconditioner(model3, optimizer=sgd3, kl_clip=None)
    assert stability_of(sgd3, list(model3.parameters())) is None
    # removing the preconditioner (or dropping it) restores the base rule
    pre2.remove()
    assert stability_of(sgd, params2).inverse_sqrt is None  # type: ignore[union-attr]
    sgd4 = torch.optim.SGD(_mlp().parameters(), lr=0.2)
    KFACPreconditioner(_mlp(), optimizer=sgd4, kl_clip=None)
    gc.collect()
    assert "K-FAC" not in stability_of(sgd4, list(sgd4.param_groups[0]["params"])).rule  # type: ignore[union-attr]


@pytest.mark.parametrize("factor", [0.95, 1.05])
def test_kfac_gd_on_a_quadratic_is_stable_below_the_threshold(factor: float) -> None:
    """Linear regression with K-FAC frozen after its first step: plain GD on λ_max(P⁻¹H)."""
    n, d = 32, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=DT) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)
    y = torch.randn(n, 1, generator=gen, dtype=DT)
    torch.manual_seed(0)
    layer = nn.Linear(d, 1).double()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    pre = KFACPreconditioner(
        layer, optimizer=opt, damping=0.1, kl_clip=None, factor_update_every=10**6,
        inverse_update_every=10**6,
    )  # fmt: skip

    def loss() -> torch.Tensor:
        return 0.5 * ((layer(x) - y) ** 2).mean()

    loss().backward()
    pre.step()  # factors and eigenbasis frozen from here on
    opt.zero_grad()
    params = list(layer.parameters())
    stab = stability_of(opt, params)
    flat0 = flatten([p.detach() for p in params])
    h = torch.autograd.functional.hessian(
        lambda f: 0.5 * ((x @ f[:d, None] + f[d] - y) ** 2).mean(), flat0
    )
    s_dense = torch.stack(
        [flatten(stab.inverse_sqrt(unflatten(e, params))) for e in torch.eye(d + 1, dtype=DT)]  # type: ignore[union-attr]
    )
    lam = float(torch.linalg.eigvalsh(s_dense @ h @ s_dense)[-1])
    lr = factor * stab.threshold / lam  # type: ignore[union-attr]
    for g in opt.param_groups:
        g["lr"] = lr
    start = float(loss().detach())
    for _ in range(400):
        opt.zero_grad()
        loss().backward()
        pre.step()
        opt.step()
    final = float(loss().detach())
    if factor < 1:
        assert final < start
    else:
        assert not math.isfinite(final) or final > 1e6 * start
