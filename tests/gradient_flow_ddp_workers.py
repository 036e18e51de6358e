"""The gradient-flow measures under ``torch.distributed`` (Lightning-free, for spawned ranks)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_landscape.measures.gradient_flow import Flow, step_gap, window_deviation
from lightning_landscape.measures.operators import NonFiniteError, ProbeHessian
from lightning_landscape.measures.probe import Probe

from .ddp_workers import PROBE_BATCH, ce, gloo_group, mlp, shard, vectors

LR = 0.3


def flow_of(size: int) -> Flow:
    """An Adam-like diagonal P with coupled and decoupled weight decay (fixed, as on every rank)."""
    _, diag = vectors(size)
    decay = torch.linspace(0.0, 0.02, size, dtype=torch.float64)
    return Flow.preconditioned(diag, coupled=decay, decoupled=decay.flip(0))


def measure_flow(model: nn.Module, probe: Probe) -> dict[str, torch.Tensor]:
    """Step gaps and windows, plain and preconditioned, in a fixed order."""
    op = ProbeHessian(model, probe, ce)
    v, _ = vectors(op.size)
    flow = flow_of(op.size)
    start = op.vector()
    end = start + 0.05 * v  # any end point: the flow's end is what is reduced
    out: dict[str, torch.Tensor] = {}
    gap, gap_pre = step_gap(op, LR), step_gap(op, LR, flow=flow)
    out["gap"] = torch.tensor([gap.value, gap.speed, gap.loss], dtype=torch.float64)
    out["gap_pre"] = torch.tensor([gap_pre.value, gap_pre.speed], dtype=torch.float64)
    for name, f in (("window", None), ("window_pre", flow)):
        w = window_deviation(op, start=start, end=end, time=0.6, rate=4.0, c=0.5, flow=f)
        out[name] = torch.tensor([w.deviation, w.relative_to_steps, w.gradients])
        out[name + "_end"] = w.path.end
    out["params_after"] = op.vector()
    return out


def _nan_checks(model: nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """A NaN sample on rank 1 only: every rank raises, and the ranks stay in step."""
    op = ProbeHessian(model, Probe.from_samples(shard(rank, world, 1), batch_size=PROBE_BATCH), ce)
    out = {}
    calls = {
        "gap": lambda: step_gap(op, LR),
        "window": lambda: window_deviation(
            op, start=op.vector(), end=op.vector(), time=0.3, rate=2.0
        ),
    }
    for name, call in calls.items():
        try:
            call()
            out[f"nan_{name}"] = torch.tensor(0)
        except NonFiniteError:
            out[f"nan_{name}"] = torch.tensor(1)
    alive = torch.ones(1)
    dist.all_reduce(alive)
    out["alive"] = alive
    return out


def flow_worker(rank: int, world: int, folder: str) -> None:
    """Spawned child: join a gloo group, measure this rank's shard, save ``rank<r>.pt``."""
    start = time.perf_counter()
    with gloo_group(rank, world, folder):
        model = mlp()
        probe = Probe.from_samples(shard(rank, world), batch_size=PROBE_BATCH)
        out = measure_flow(model, probe)
        out.update(_nan_checks(model, rank, world))
        out["seconds"] = torch.tensor(time.perf_counter() - start)
        torch.save(out, f"{folder}/rank{rank}.pt")
