"""Sums over ranks that survive a failure on one rank.

Every rank of a measurement runs the same collectives in the same order. If one rank raised
inside its local part of a product (an out-of-memory error, a ``training_step`` that returns
``None``, an operation without double backward) and left the collective, the others would wait
in it forever. :func:`reduce_sum` runs the local part, and on an exception contributes zeros
plus a *failure flag* to the same reduction: every rank learns of the failure from the reduced
flag, the failing rank re-raises its own exception and the others raise :class:`PeerFailure`,
all at the same collective — so a measurement is abandoned together and nothing hangs.
The flag costs one element per reduction.

Example::

    >>> import torch
    >>> reduce_sum(lambda: torch.ones(3), torch.zeros(3), world_size=1)
    tensor([1., 1., 1.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PeerFailure", "reduce_sum"]


class PeerFailure(RuntimeError):
    """A measurement failed on another rank (this rank's part was fine)."""


def reduce_sum(
    local: Callable[[], torch.Tensor],
    like: torch.Tensor,
    *,
    world_size: int,
    group: Any = None,
) -> torch.Tensor:
    """``local()`` summed over ranks; a local exception is re-raised after the reduction.

    Args:
        local: this rank's part (a tensor shaped like ``like``).
        like: the shape, dtype and device of the result (its values are not used).
        world_size: ranks in ``group`` (1: no collective, ``local()`` as it is).
        group: the process group.

    Raises:
        PeerFailure: on every rank whose part succeeded when another rank's failed.
    """
    if world_size <= 1:
        return local()
    error: Exception | None = None
    try:
        part = local().reshape(-1).to(like.dtype)
    except Exception as err:  # reaches the other ranks through the flag below
        error = err
        part = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    flag = torch.ones(1, dtype=like.dtype, device=like.device) * (error is not None)
    buffer = torch.cat([part, flag])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    if bool(buffer[-1] > 0):
        raise PeerFailure(f"the measurement failed on {int(buffer[-1].item())} other process(es)")
    return buffer[:-1].reshape(like.shape)
