"""Distributed invariant of the gradient-flow measures: DDP on unequal shards = the union.

Spawned ranks (gloo, 2 and 3 processes) each hold one shard of the probe (7, 11, 4 samples in
batches of at most 3); the step gaps (plain and Adam-like preconditioned with weight decays)
and the RK4 windows equal one process on the union of the shards, bit-identically on every
rank, and the plain step gap equals the dense float64 formula ``(η/2)‖Hg‖/‖g‖``. A NaN sample
on rank 1 only makes every rank raise, and the ranks stay in step. The callback adds no
collective of its own (its window bookkeeping is identical on every rank), so the pure-torch
level is where the invariant lives.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lightning_landscape.measures.operators import flatten
from lightning_landscape.measures.probe import Probe

from . import ddp_workers
from . import gradient_flow_ddp_workers as workers
from .ddp_workers import SHARDS, data, dense_hessian, mlp, one_thread, spawn

WORLDS = [2, 3]


@pytest.fixture(scope="module", autouse=True)
def _preload() -> None:
    # a no-op when tests/test_ddp.py already started the (process-wide) fork server
    multiprocessing.set_forkserver_preload([ddp_workers.__name__, workers.__name__])


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with one_thread():
        yield


@pytest.mark.parametrize("world", WORLDS)
def test_gradient_flow_measures_equal_the_union(world: int, tmp_path: Path) -> None:
    spawn(workers.flow_worker, (world, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = mlp()
    x, y = data(sum(SHARDS[:world]))
    union = workers.measure_flow(model, Probe.from_samples((x, y), batch_size=5))
    for name in union:
        for r in range(1, world):
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)
        torch.testing.assert_close(ranks[0][name], union[name], rtol=1e-11, atol=1e-13, msg=name)
    assert torch.equal(ranks[0]["params_after"], flatten([p.detach() for p in model.parameters()]))
    # dense ground truth of the plain step gap
    h = dense_hessian(model, x, y)
    g = flatten(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    exact = 0.5 * workers.LR * float((h @ g).norm() / g.norm())
    assert float(ranks[0]["gap"][0]) == pytest.approx(exact, rel=1e-11)
    for name in ("gap", "window"):
        assert all(int(rk[f"nan_{name}"]) == 1 for rk in ranks), name
    assert all(float(rk["alive"]) == world for rk in ranks)
