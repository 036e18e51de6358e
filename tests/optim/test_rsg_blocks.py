"""The CPU foreach path of RSG/ARSG (the CPU default) runs over cache-sized buckets: same bits.

``cache_blocks`` cuts contiguous tensors larger than a block into flat views and gathers small
ones; the steps are elementwise, so a bucketed trajectory equals the single-tensor one bit for
bit, for tensors cut at odd offsets, non-contiguous gradients (kept whole), and both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_landscape.optim import ARSG, RSG, _base
from lightning_landscape.optim._base import cache_blocks

MAKERS = {
    "rsg": lambda ps, **kw: RSG(ps, lr=0.1, beta=0.9, observation=0.2, weight_decay=0.01, **kw),
    "arsg": lambda ps, **kw: ARSG(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.01, **kw),
    "arsg_adam": lambda ps, **kw: ARSG(
        ps, lr=0.01, betas=(0.9, 0.99), amsgrad=False, observation=0.3, **kw
    ),
}


def test_cache_blocks_cover_every_element_once() -> None:
    a, b = torch.arange(10.0), torch.arange(3.0)
    c = torch.arange(12.0).reshape(3, 4).T  # not contiguous: kept whole
    buckets = cache_blocks([[a, b, c], [a.clone(), b.clone(), c.clone()]], block=4)
    seen = [(i, t.numel()) for idx, (ts, _) in buckets for i, t in zip(idx, ts)]
    assert seen == [(0, 4), (0, 4), (0, 2), (1, 3), (2, 12)]
    for _, (ts, us) in buckets:  # parallel lists stay aligned
        assert all(torch.equal(t, u) for t, u in zip(ts, us))
    assert all(t.data_ptr() == a.data_ptr() for t in buckets[0][1][0])  # views, not copies


def _trajectory(name: str, foreach: bool | None, steps: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 29), (5,), (1000,), (3, 7)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = MAKERS[name](ps, foreach=foreach)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        ps[3].grad = torch.randn(7, 3, generator=gen).T  # a non-contiguous gradient
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bucketed_foreach_equals_single_tensor_bit_for_bit(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = _trajectory(name, foreach=False)
    monkeypatch.setattr(_base.cache_blocks, "__defaults__", (50,))  # cut at unaligned offsets
    bucketed = _trajectory(name, foreach=True)
    assert all(torch.equal(p, q) for p, q in zip(single, bucketed))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_default_on_cpu_is_the_bucketed_foreach_path(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_landscape.optim import _rsg_functional as F

    calls: list[str] = []

    def recording(fn: str) -> Callable[..., None]:
        real = getattr(F, fn)

        def wrapper(*args: Any, **kwargs: Any) -> None:
            calls.append(fn)
            real(*args, **kwargs)

        return wrapper

    for fn in ("rsg_multi", "arsg_multi", "rsg_single", "arsg_single"):
        monkeypatch.setattr(F, fn, recording(fn))
    default = _trajectory(name, foreach=None)
    assert calls and all(c.endswith("_multi") for c in calls)
    calls.clear()
    single = _trajectory(name, foreach=False)
    assert calls and all(c.endswith("_single") for c in calls)
    assert all(torch.equal(p, q) for p, q in zip(default, single))
