"""``method="forward_over_reverse"`` falls back to double backward where torch cannot do it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe


def test_mse_loss_falls_back_with_one_warning_and_the_same_products() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    probe = Probe.from_samples((x, y), batch_size=4)

    def mse(m, b):  # type: ignore[no-untyped-def]
        return F.mse_loss(m(b[0]), b[1])

    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    want = ProbeHessian(net, probe, mse).matvec(v)
    op = ProbeHessian(net, probe, mse, method="forward_over_reverse")
    with pytest.warns(UserWarning, match="forward-mode derivative") as caught:
        got = op.matvec(v)
        again = op.matvec(v)
    assert len([w for w in caught if "forward-mode" in str(w.message)]) == 1
    assert op.hvp_method == "reverse_over_reverse"
    assert torch.allclose(got, want, rtol=1e-12) and torch.equal(got, again)
