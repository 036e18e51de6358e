"""K-FAC's eigendecomposition retries in float64 when float32 ``eigh`` gives NaN silently."""

from __future__ import annotations

import torch

from lightning_landscape.optim.kfac import factors


def test_non_finite_float32_eigh_is_retried_in_float64(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen)
    a = x @ x.T  # rank 3: exactly singular, like a conv factor of padded patches
    real = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky(m: torch.Tensor):  # float32 returns NaN without raising (seen on 1 CPU thread)
        calls.append(m.dtype)
        d, q = real(m)
        if m.dtype == torch.float32:
            return torch.full_like(d, float("nan")), q
        return d, q

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    d, q = factors.eigen(a)
    assert calls == [torch.float32, torch.float64]
    assert d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    assert torch.allclose(q @ torch.diag(d) @ q.T, a, atol=1e-4)
