"""Collectives of the K-FAC preconditioner: one packed all-reduce, layer ownership by cost.

Everything is a no-op without an initialised ``torch.distributed`` process group (or with one
process), so the preconditioner calls the same functions in a plain loop.

Example::

    >>> owners([8.0, 1.0, 27.0, 1.0], world=2)   # largest first, to the least loaded rank
    [1, 1, 0, 1]
    >>> import torch
    >>> [t.tolist() for t in all_reduce_sum([torch.ones(2), torch.zeros(1)])]
    [[1.0, 1.0], [0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "owners", "rank", "world_size"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group=group)
    return 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=group)
    return 0


def all_reduce_sum(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Sum every tensor over the ranks with a single collective (tensors share one dtype).

    Returns new tensors (views of one flat buffer) shaped like the inputs; with one process,
    the inputs themselves.
    """
    if world_size(group) == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def owners(costs: Sequence[float], world: int) -> list[int]:
    """Assign each job to a rank: largest cost first, each to the least loaded rank.

    Deterministic (ties go to the lower rank, equal costs keep their order), so every rank
    computes the same assignment.
    """
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[i] = r
        load[r] += costs[i]
    return out
