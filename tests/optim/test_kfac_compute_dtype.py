"""``compute_dtype=torch.bfloat16``: the per-step products in bf16 on one cast work matrix.

The preconditioned gradients (exact and π damping, Linear with and without bias, Conv2d) stay
within bf16 accuracy of the float32 products, keep the gradients' dtype, and the KL-clip scale
``ν`` agrees.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(64, 12, bias=False), nn.Tanh(), nn.Linear(12, 3),
    )  # fmt: skip


def _preconditioned(model: nn.Module, **kw: object) -> tuple[list[torch.Tensor], float]:
    pre = KFACPreconditioner(model, damping=0.01, lr=0.1, kl_clip=1e-3, **kw)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step preconditions with the first step's factors
        x, y = torch.randn(16, 1, 4, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    return [p.grad.clone() for p in model.parameters()], pre.kl_scale  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_bf16_products_match_float32(mode: str) -> None:
    model = _model()
    want, nu_want = _preconditioned(copy.deepcopy(model), damping_mode=mode)
    got, nu_got = _preconditioned(model, damping_mode=mode, compute_dtype=torch.bfloat16)
    assert nu_got == pytest.approx(nu_want, rel=3e-2)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=0.0, atol=3e-2 * scale)
