"""The pure-torch side of the loss-landscape DDP test, kept free of Lightning (fast children).

Every rank evaluates the same surfaces and interpolation on its own probe shard (the unequal
shards of :mod:`tests.ddp_workers`); :func:`landscape_all` is also what the parent runs on the
union to get the single-process reference.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_landscape.measures.landscape import (
    filter_normalized_directions,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.measures.operators import ProbeHessian, flatten
from lightning_landscape.measures.probe import Probe

from .ddp_workers import PROBE_BATCH, ce, gloo_group, mlp, shard

RESOLUTION = 5  # 26 points per 2-D surface (with θ), in chunks of CHUNK
CHUNK = 7


def initial_weights() -> torch.Tensor:
    """θ0 of the interpolation: another initialisation of the same network."""
    return flatten([p.detach() for p in mlp(seed=1).parameters()])


def landscape_all(model: nn.Module, probe: Probe) -> dict[str, torch.Tensor]:
    """Every landscape quantity, in a fixed order (identical collectives on every rank)."""
    op = ProbeHessian(model, probe, ce)
    out: dict[str, torch.Tensor] = {}
    reductions = [0]
    all_reduce = dist.all_reduce

    def counting(*args: object, **kwargs: object) -> object:
        reductions[0] += 1
        return all_reduce(*args, **kwargs)  # type: ignore[arg-type]

    dirs = filter_normalized_directions(op.parameters, count=2, seed=0, keep_1d=True)
    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        surface = loss_surface(op, dirs, resolution=RESOLUTION, span=0.8, chunk_size=CHUNK)
    finally:
        dist.all_reduce = all_reduce
    out["reductions"] = torch.tensor(reductions[0])
    out["surface"], out["center"] = (
        surface.losses,
        torch.tensor(surface.center, dtype=torch.float64),
    )
    out["line"] = loss_surface(op, dirs[1:], resolution=4, span=2.0, chunk_size=3).losses
    interp = linear_interpolation(op, initial_weights(), resolution=6, chunk_size=4)
    out["interpolation"], out["barrier"] = (
        interp.losses,
        torch.tensor(interp.barrier, dtype=torch.float64),
    )
    out["params_after"] = op.vector()
    return out


def landscape_worker(rank: int, world: int, folder: str) -> None:
    """Spawned child: join a gloo group, evaluate on this rank's shard, save ``rank<r>.pt``."""
    start = time.perf_counter()
    with gloo_group(rank, world, folder):
        probe = Probe.from_samples(shard(rank, world), batch_size=PROBE_BATCH)
        out = landscape_all(mlp(), probe)
        out["seconds"] = torch.tensor(time.perf_counter() - start)
        torch.save(out, f"{folder}/rank{rank}.pt")
