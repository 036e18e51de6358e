"""K-FAC with the true (sampled) Fisher and with bf16 products (``sample_fisher``, ``compute_dtype``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.kfac.fisher import output_sample

torch.set_num_threads(1)


def _net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(dtype)


def _pre(model: nn.Module, **kw: object) -> KFACPreconditioner:
    args: dict[str, object] = dict(factor_update_every=1, inverse_update_every=1, kl_clip=None)
    args.update(kw)
    return KFACPreconditioner(model, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_sampled_fisher_is_the_empirical_fisher_of_the_sampled_gradients(likelihood: str) -> None:
    """G from ``sample_fisher`` = G of a backward whose output gradients are the samples."""
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    net = _net()
    twin = copy.deepcopy(net)
    pre, ref = _pre(net), _pre(twin)
    out = net(x)
    assert pre.sample_fisher(
        out, likelihood, variance=0.5, generator=torch.Generator().manual_seed(3)
    )
    loss = (out - y).pow(2).sum(1).mean()
    loss.backward()
    with ref.paused():
        expected_grads = torch.autograd.grad(
            (twin(x) - y).pow(2).sum(1).mean(), list(twin.parameters())
        )
    for p, g in zip(net.parameters(), expected_grads):  # the training gradients are untouched
        torch.testing.assert_close(p.grad, g)
    sample = output_sample(out, likelihood, 0.5, torch.Generator().manual_seed(3))
    (twin(x) * sample).sum(1).mean().backward()  # output gradients = sample / N (mean)
    pre.step()
    ref.step()
    for name, (a, g) in pre.factors().items():
        a_ref, g_ref = ref.factors()[name]
        torch.testing.assert_close(a, a_ref)
        torch.testing.assert_close(g, g_ref)


def test_sample_fisher_only_on_recorded_forwards_and_checks_arguments() -> None:
    net = _net()
    pre = _pre(net, factor_update_every=2)
    x = torch.randn(6, 5, dtype=torch.float64)
    out = net(x)
    assert pre.sample_fisher(out)
    out.sum().backward()
    pre.step()
    out = net(x)  # step 1: not a factor-update step
    assert not pre.sample_fisher(out)
    with pre.paused():
        assert not pre.sample_fisher(net(x))
    with pytest.raises(ValueError, match="`likelihood`"):
        pre.sample_fisher(out, "poisson")
    with pytest.raises(ValueError, match="`variance`"):
        pre.sample_fisher(out, variance=0.0)


def test_categorical_samples_have_the_fisher_covariance() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64).expand(20000, 3)
    v = output_sample(logits, "categorical", 1.0, torch.Generator().manual_seed(0))
    p = torch.softmax(logits[0], 0)
    torch.testing.assert_close(
        v.T @ v / len(v), torch.diag(p) - torch.outer(p, p), atol=1e-2, rtol=0
    )
    g = output_sample(torch.zeros(20000, 2), "gaussian", 0.25, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g.var(0), torch.full((2,), 4.0), atol=0.15, rtol=0)


def test_bf16_products_match_float32_to_bf16_precision() -> None:
    x, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    grads = []
    for cd in (None, torch.bfloat16):
        net = _net(dtype=torch.float32)
        pre = _pre(net, damping=1e-2, compute_dtype=cd)
        for _ in range(2):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            pre.step()
        grads.append([p.grad.clone() for p in net.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    for g32, g16 in zip(*grads):
        assert float((g32 - g16).norm() / g32.norm()) < 3e-2
    with pytest.raises(ValueError, match="`compute_dtype`"):
        _pre(_net(), compute_dtype=torch.int32)
