"""``maximize`` in RSG and ARSG: foreach/single parity, and maximising f is minimising −f.

The gradient is negated before the L2 decay is added (torch's convention), so with
``p.grad = G`` and ``maximize=True`` every step is bit for bit the step with ``p.grad = −G``
and ``maximize=False``, weight decay included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_landscape.optim import ARSG, RSG, stability_of

from .test_optimizers import DT, _data, _grads, _loss, _net

CONFIGS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rsg": lambda ps, **kw: RSG(ps, lr=0.1, beta=0.9, observation=0.2, weight_decay=0.01, **kw),
    "rsg_mu0": lambda ps, **kw: RSG(ps, lr=0.1, beta=0.9, observation=0.0, **kw),
    "arsg": lambda ps, **kw: ARSG(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.01, **kw),
    "arsg_adam": lambda ps, **kw: ARSG(
        ps, lr=0.01, betas=(0.9, 0.99), amsgrad=False, observation=0.3, weight_decay=0.02, **kw
    ),
}


def _mixed_net() -> list[torch.nn.Parameter]:
    """The MLP of ``test_optimizers`` with one float32 and one float16 tensor (three buckets)."""
    ps = _net()
    ps[1] = torch.nn.Parameter(ps[1].detach().float())
    ps[3] = torch.nn.Parameter(ps[3].detach().half())
    return ps


def _trajectory(
    name: str, foreach: bool, maximize: bool, sign: float, steps: int = 8
) -> list[list[torch.Tensor]]:
    """Steps with ``p.grad = sign·∇L`` (``∇L`` of the MLP loss); parameters after each step."""
    x, y = _data()
    ps = _mixed_net()
    opt = CONFIGS[name](ps, foreach=foreach, maximize=maximize)
    out = []
    for k in range(steps):
        for p, g in zip(ps, _grads(ps, x, y)):
            p.grad = (g if sign > 0 else -g).to(p.dtype)
        if k < 2:
            ps[2].grad = None  # joins late: first and later steps in one bucket
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def _equal(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(torch.equal(p, q) for xs, ys in zip(a, b) for p, q in zip(xs, ys))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_maximize_foreach_matches_single_tensor(name: str) -> None:
    assert _equal(_trajectory(name, False, True, 1.0), _trajectory(name, True, True, 1.0))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_maximize_f_is_minimize_minus_f_bit_for_bit(name: str, foreach: bool) -> None:
    maxed = _trajectory(name, foreach, True, 1.0)
    assert _equal(maxed, _trajectory(name, foreach, False, -1.0))
    assert not _equal(maxed, _trajectory(name, foreach, False, 1.0))  # it does change the step


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_maximize_through_autograd_on_minus_f(name: str) -> None:
    """Gradients from autograd of f and of −f (not negated by hand): equal to 1e-12."""
    x, y = _data()
    runs = []
    for maximize in (True, False):
        ps = _net()
        opt = CONFIGS[name](ps, maximize=maximize)
        for _ in range(10):
            opt.zero_grad()
            loss = _loss(ps, x, y)
            (loss if maximize else -loss).backward()
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_maximize_ascends_a_concave_function(name: str) -> None:
    """``f = −½‖θ − 1‖²``: maximize walks to its maximiser, f increases."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    opt = CONFIGS[name]([w], maximize=True)
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
        g["lr"] = 0.05

    def f() -> torch.Tensor:
        return -0.5 * ((w - 1.0) ** 2).sum()

    start = float(f().detach())
    for _ in range(300):
        opt.zero_grad()
        f().backward()
        opt.step()
    assert float(f().detach()) > max(start, -0.05)


def test_maximize_gives_no_stability_threshold_and_is_validated() -> None:
    """Maximising f follows −H (+ D): no threshold on λ_max(H) applies (module doc)."""
    w = torch.nn.Parameter(torch.ones(2, dtype=DT))
    for make in CONFIGS.values():
        assert stability_of(make([w]), [w]) is not None
        assert stability_of(make([w], maximize=True), [w]) is None
        groups: list[dict[str, Any]] = [{"params": [w], "maximize": True}]
        assert stability_of(make(groups), [w]) is None  # per group too
        with pytest.raises(ValueError, match="`maximize` must be a bool, got 1"):
            make([w], maximize=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_without_maximize_loads_and_minimizes(name: str) -> None:
    """A state dict saved before ``maximize`` existed (no key in its groups) still steps."""
    x, y = _data()
    ps = _net()
    ref = CONFIGS[name](ps)
    for p, g in zip(ps, _grads(ps, x, y)):
        p.grad = g
    ref.step()
    state = copy.deepcopy(ref.state_dict())
    for g in state["param_groups"]:
        del g["maximize"]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = CONFIGS[name](ps2)
    opt.load_state_dict(state)
    for p, q in zip(ps, ps2):
        q.grad = p.grad.clone()
    ref.step()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))
