"""The package's optimizers on CUDA: foreach vs single-tensor parity, ``foreach=None`` dispatch,
and CUDA trajectories equal to the CPU ones.

The configurations are the CPU conformance table of ``tests/optim/test_optimizers.py`` when it
imports. On CUDA the two paths run different kernels (``torch._foreach_norm`` against
``torch.linalg.vector_norm``, fused foreach arithmetic), so parity is to rounding, not bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from lightning_landscape.optim import ARSG, RSG, NovoGrad

try:  # the CPU conformance table: one source of configurations
    from ..optim.test_optimizers import OURS
except ImportError:  # pragma: no cover - the CPU suite moved
    _CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
        "novograd": (NovoGrad, {"lr": 0.05, "betas": (0.9, 0.95)}),
        "novograd_avg_ams_wd_max": (NovoGrad, {"lr": 0.05, "grad_averaging": True, "amsgrad": True,
                                               "weight_decay": 0.01, "maximize": True}),
        "rsg": (RSG, {"lr": 0.1, "beta": 0.9, "observation": 0.2, "weight_decay": 0.01}),
        "arsg": (ARSG, {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.01}),
        "arsg_adam": (ARSG, {"lr": 0.01, "betas": (0.9, 0.99), "amsgrad": False, "observation": 0.3}),
    }  # fmt: skip

    def _factory(cls: type[torch.optim.Optimizer], defaults: dict[str, Any]) -> Callable[..., Any]:
        return lambda ps, **kw: cls(ps, **{**defaults, **kw})

    OURS = {name: _factory(cls, kw) for name, (cls, kw) in _CONFIGS.items()}

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

Factory = Callable[..., torch.optim.Optimizer]
DT = torch.float64


def _net(device: str) -> list[torch.nn.Parameter]:
    """A 5 → 4 → 3 tanh MLP as four tensors; the first bias in float32 (two foreach buckets)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (4,), (3, 4), (3,)]
    ps = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    ps[1] = ps[1].float()
    return [torch.nn.Parameter(p.to(device)) for p in ps]


def _loss(ps: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = ps
    out = torch.tanh(x @ w1.T + b1.to(DT)) @ w2.T + b2
    return ((out - y) ** 2).mean()


def _trajectory(
    factory: Factory, device: str, steps: int = 8, **kw: Any
) -> list[list[torch.Tensor]]:
    """``steps`` steps on a fixed batch; the third tensor has no gradient for the first 3 steps
    (it joins late: first and later steps in one bucket). Parameters after each step, on CPU."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen, dtype=DT), torch.randn(8, 3, generator=gen, dtype=DT)
    x, y = x.to(device), y.to(device)
    ps = _net(device)
    opt = factory(ps, **kw)
    out = []
    for k in range(steps):
        leaves = [p.detach().requires_grad_() for p in ps]
        grads = torch.autograd.grad(_loss(leaves, x, y), leaves)
        for p, g in zip(ps, grads):
            p.grad = g.to(p.dtype)
        if k < 3:
            ps[2].grad = None
        opt.step()
        out.append([p.detach().cpu().clone() for p in ps])
    return out


def _close(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], name: str) -> None:
    for step, (xs, ys) in enumerate(zip(a, b)):
        for i, (p, q) in enumerate(zip(xs, ys)):
            assert p.dtype == q.dtype
            tol = 1e-10 if p.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(
                p, q, rtol=tol, atol=tol, msg=f"{name} step {step} tensor {i}"
            )


@pytest.mark.parametrize("name", sorted(OURS))
def test_foreach_matches_single_tensor_on_cuda(name: str) -> None:
    single = _trajectory(OURS[name], "cuda", foreach=False)
    multi = _trajectory(OURS[name], "cuda", foreach=True)
    _close(single, multi, name)
    assert not torch.equal(multi[-1][0], _net("cpu")[0].detach())  # it did move


@pytest.mark.parametrize("name", sorted(OURS))
def test_foreach_none_takes_the_foreach_path_on_cuda(name: str) -> None:
    default = _trajectory(OURS[name], "cuda")
    multi = _trajectory(OURS[name], "cuda", foreach=True)
    for a, b in zip(default, multi):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), name


@pytest.mark.parametrize("name", sorted(OURS))
def test_cuda_trajectory_equals_cpu(name: str) -> None:
    _close(_trajectory(OURS[name], "cpu", foreach=False), _trajectory(OURS[name], "cuda"), name)
