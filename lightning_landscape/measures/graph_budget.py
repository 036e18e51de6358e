"""How much memory the kept first-order graphs of a probe take, and the budget they get.

:class:`~lightning_landscape.measures.operators.ProbeHessian` keeps every probe batch's
first-order gradient graph alive so that each further product is one double-backward pass. On
a large model that can be an out-of-memory error; so while the first batch's graph is built,
:class:`SavedBytes` counts the bytes of the tensors autograd saves (each storage once, leaving
parameters, buffers and the batch itself out), the operator scales that to the whole probe and,
above ``graph_memory_budget``, computes products batch by batch without kept graphs.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, Literal

import torch

__all__ = ["CPU_GRAPH_BUDGET", "CUDA_GRAPH_FRACTION", "GraphBudget", "SavedBytes", "check_budget"]

GraphBudget = int | float | Literal["auto"] | None

CPU_GRAPH_BUDGET = 2 * 2**30
"""``graph_memory_budget="auto"`` off CUDA: 2 GiB of kept graphs."""
CUDA_GRAPH_FRACTION = 0.25
"""``graph_memory_budget="auto"`` on CUDA: this share of the memory free for tensors."""


def _storage(t: torch.Tensor) -> tuple[Any, int, Any]:
    """A key naming ``t``'s storage, the storage's size in bytes, and what keeps it alive."""
    try:
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes(), storage
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (subclasses)
        return id(t), t.numel() * t.element_size(), t


class SavedBytes:
    """Counts the bytes of the storages autograd saves, each once, leaving ``known`` out."""

    def __init__(self, known: Iterable[torch.Tensor]) -> None:
        self.seen = {_storage(t)[0] for t in known}
        self.bytes = 0
        # Keys are addresses: a storage counted, then freed, could hand its address to a new
        # one, which would go uncounted. Holding each counted storage until the count is
        # dropped keeps every address unique (the graph holds most of them anyway).
        self._alive: list[Any] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes, owner = _storage(t)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += nbytes
            self._alive.append(owner)
        return t.detach()  # not `t`: that would be a reference cycle (see the hooks' doc)

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def check_budget(budget: object) -> GraphBudget:
    if budget is None or (isinstance(budget, str) and budget == "auto"):
        return "auto" if budget is not None else None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not float(budget) >= 0:
        raise ValueError(
            f"`graph_memory_budget` must be 'auto', None or a number of bytes >= 0, got {budget!r}"
        )
    return float(budget)
