"""Lightning-free pieces of the sample-variance DDP tests: model, shards and the spawned worker.

Kept free of Lightning so a spawned child imports it quickly (see ``tests/ddp_workers.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning_landscape.measures.operators import NonFiniteError
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.variance import sample_variance

from .ddp_workers import PROBE_BATCH, SHARDS, gloo_group


def conv_net(seed: int = 0) -> nn.Sequential:
    """Conv2d → ReLU → Linear → ReLU → Linear in float64 (channel units, then feature units)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).double()


def images(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64) + 0.3


def shard(rank: int, world: int, nan: bool = False) -> torch.Tensor:
    """Rank ``rank``'s samples of the union ``images(sum(SHARDS[:world]))`` (NaN on rank 1)."""
    x = images(sum(SHARDS[:world]))
    start = sum(SHARDS[:rank])
    x = x[start : start + SHARDS[rank]].clone()
    if nan and rank == 1:
        x[2, 0, 1, 1] = float("nan")
    return x


def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sample-variance result on ``x`` (probe batches of ``PROBE_BATCH``) as tensors."""
    res = sample_variance(conv_net(), Probe.from_samples(x, batch_size=PROBE_BATCH))
    return {
        "fractions": torch.tensor(res.fractions, dtype=torch.float64),
        "variance": torch.tensor(res.variance, dtype=torch.float64),
        "second_moment": torch.tensor(res.second_moment, dtype=torch.float64),
        "num_samples": torch.tensor(res.num_samples),
        "last_over_first": torch.tensor(res.last_over_first, dtype=torch.float64),
    }


def variance_worker(rank: int, world: int, folder: str) -> None:
    """Spawned child: join a gloo group, measure this rank's shard, save to ``rank<r>.pt``."""
    with gloo_group(rank, world, folder):
        out = measure(shard(rank, world))
        try:  # a NaN on rank 1 only: every rank must raise, and stay in step
            measure(shard(rank, world, nan=True))
            out["nan_raised"] = torch.tensor(0)
        except NonFiniteError:
            out["nan_raised"] = torch.tensor(1)
        alive = torch.ones(1)
        dist.all_reduce(alive)
        out["alive"] = alive
        torch.save(out, f"{folder}/rank{rank}.pt")
