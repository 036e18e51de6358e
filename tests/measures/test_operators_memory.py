"""The memory budget of ProbeHessian's graph reuse (kept first-order graphs)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_landscape.measures.graph_budget import SavedBytes
from lightning_landscape.measures.operators import (
    CPU_GRAPH_BUDGET,
    CUDA_GRAPH_FRACTION,
    ProbeHessian,
)
from lightning_landscape.measures.probe import batch_tensors

from .helpers import ce_loss, dense_hessian, probe_of, tiny_data, tiny_mlp


def _vectors(size: int, k: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(size, generator=gen, dtype=torch.float64) for _ in range(k)]


def test_tiny_budget_drops_reuse_with_identical_products():
    model = tiny_mlp()
    x, y = tiny_data(13)
    kept = ProbeHessian(model, probe_of(x, y, 4), ce_loss, graph_memory_budget=None)
    tight = ProbeHessian(model, probe_of(x, y, 4), ce_loss, graph_memory_budget=16)
    for v in _vectors(kept.size):
        assert torch.equal(tight.matvec(v), kept.matvec(v))
    assert kept.reuse_graph and kept._graphs is not None and len(kept._graphs) == 4
    assert not tight.reuse_graph and tight._graphs is None
    assert tight.graph_bytes == kept.graph_bytes and tight.graph_bytes > 16
    assert "budget" in (tight.graph_fallback or "") and kept.graph_fallback is None
    v = _vectors(kept.size, 1)[0]
    torch.testing.assert_close(tight.matvec(v), dense_hessian(model, x, y) @ v)


@pytest.mark.parametrize("budget", ["auto", None, 10**12, math.inf])
def test_ample_budget_keeps_graphs(budget):
    model = tiny_mlp()
    x, y = tiny_data(9)
    op = ProbeHessian(model, probe_of(x, y, 3), ce_loss, graph_memory_budget=budget)
    assert op.graph_bytes is None  # not estimated before the first product
    op.matvec(torch.ones(op.size, dtype=torch.float64))
    assert op.reuse_graph and op._graphs is not None and len(op._graphs) == 3
    assert 0 < op.graph_bytes < CPU_GRAPH_BUDGET


def test_estimate_matches_counting_every_batch():
    model = tiny_mlp()
    x, y = tiny_data(12)
    probe = probe_of(x, y, 4)  # three equal batches: the scaled first batch is exact
    op = ProbeHessian(model, probe, ce_loss)
    op.matvec(torch.ones(op.size, dtype=torch.float64))
    known = [*model.parameters(), *(t for b in probe for t in batch_tensors(b))]
    counter = SavedBytes(known)
    with counter.hooks():
        graphs = [op._gradient_graph(b) for b in probe]
    grads = sum(g.numel() * g.element_size() for gs in graphs for g in gs)
    assert op.graph_bytes == counter.bytes + grads
    assert counter.bytes > 0


def test_release_rebuilds_and_a_fall_back_stays():
    model = tiny_mlp()
    x, y = tiny_data(8)
    op = ProbeHessian(model, probe_of(x, y, 4), ce_loss)
    v = torch.ones(op.size, dtype=torch.float64)
    op.matvec(v)
    first = op._graphs
    op.release()
    assert op._graphs is None and op.reuse_graph
    op.matvec(v)
    assert op._graphs is not None and op._graphs is not first
    op.graph_memory_budget = 0
    op.release()
    op.matvec(v)
    assert not op.reuse_graph and op._graphs is None
    op.graph_memory_budget = None
    op.release()
    torch.testing.assert_close(op.matvec(v), dense_hessian(model, x, y) @ v)
    assert not op.reuse_graph  # stays off for this operator


def test_no_estimate_without_reuse():
    model = tiny_mlp()
    x, y = tiny_data(6)
    for kwargs in ({"reuse_graph": False}, {"method": "forward_over_reverse"}):
        op = ProbeHessian(model, probe_of(x, y, 3), ce_loss, graph_memory_budget=0, **kwargs)
        op.matvec(torch.ones(op.size, dtype=torch.float64))
        assert op.graph_bytes is None and op.graph_fallback is None and not op.reuse_graph


def test_out_of_memory_while_building_falls_back():
    model = tiny_mlp()
    x, y = tiny_data(12)
    probe = probe_of(x, y, 4)
    raised = []

    def flaky_loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if batch[0] is probe.batches[2][0] and not raised:
            raised.append(True)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return ce_loss(m, batch)

    op = ProbeHessian(model, probe, flaky_loss)
    v = _vectors(op.size, 1)[0]
    torch.testing.assert_close(op.matvec(v), dense_hessian(model, x, y) @ v)
    assert raised and not op.reuse_graph and op._graphs is None
    assert "out of memory" in (op.graph_fallback or "")


def test_auto_budget_on_cuda_is_a_share_of_free_memory(monkeypatch):
    model = tiny_mlp()
    x, y = tiny_data(6)
    op = ProbeHessian(model, probe_of(x, y, 3), ce_loss)
    monkeypatch.setattr(op, "_home_device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    assert op._budget_bytes() == pytest.approx(CUDA_GRAPH_FRACTION * 1200)
    monkeypatch.setattr(op, "_home_device", torch.device("cpu"))
    assert op._budget_bytes() == CPU_GRAPH_BUDGET


@pytest.mark.parametrize("bad", [-1, "big", True, float("nan"), [1]])
def test_bad_budget(bad):
    model = tiny_mlp()
    x, y = tiny_data(6)
    with pytest.raises(ValueError, match=r"`graph_memory_budget` .* got "):
        ProbeHessian(model, probe_of(x, y, 3), ce_loss, graph_memory_budget=bad)
