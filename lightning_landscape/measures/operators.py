"""Hessian-vector products of the probe loss, built on hessian-eigenthings.

:class:`ProbeHessian` is the Hessian of the probe loss

.. math:: L(θ) = \\frac{1}{N} \\sum_{\\text{ranks}} \\sum_b n_b \\, \\ell_b(θ)

where ``ℓ_b`` is the mean loss of probe batch ``b`` (``n_b`` samples) and ``N`` the number of
probe samples on all ranks. It implements hessian-eigenthings' public operator interface
(``CurvatureOperator``: ``size``, ``device``, ``dtype``, ``matvec``), so the library's solvers
take it, and computes the double-backward HVP itself. It differs from the library's
``HessianOperator`` in two ways that matter for correct numbers:

- batches are weighted by their sample counts (the library averages batches uniformly);
- under ``torch.distributed`` the weighted *sums* are all-reduced once per product, so every
  rank holds the Hessian of the union of all probe shards (every rank must call ``matvec``
  the same number of times: the solvers are deterministic given the same seed).

A non-finite loss, gradient or product raises :class:`NonFiniteError` *after* the reduction, so
all ranks see the same value and skip together instead of deadlocking.

**Memory of graph reuse.** With ``reuse_graph=True`` every probe batch's first-order gradient
graph stays alive, i.e. the activations of the whole probe. While building the first batch's
graph the operator counts the bytes of the tensors autograd saves (public
``torch.autograd.graph.saved_tensors_hooks``; each storage once, parameters, buffers and the
batch's own tensors left out), scales them to the whole probe by sample count and adds one
gradient per batch: :attr:`ProbeHessian.graph_bytes`. Above ``graph_memory_budget`` it does
not keep graphs and computes each product batch by batch (same numbers, more time), and so it
does when building the graphs runs out of memory. Each rank decides on its own; the
collectives do not change, so ranks that decide differently still agree.

Example::

    >>> import torch
    >>> from lightning_landscape.measures.probe import Probe
    >>> net = torch.nn.Linear(3, 1, bias=False).double()
    >>> x = torch.randn(10, 3, dtype=torch.float64)
    >>> probe = Probe.from_samples((x, torch.zeros(10, 1, dtype=torch.float64)), batch_size=4)
    >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> op = ProbeHessian(net, probe, mse)
    >>> exact = 2 * x.T @ x / 10
    >>> torch.allclose(op.matvec(torch.ones(3, dtype=torch.float64)), exact.sum(1))
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ._compat import CurvatureOperator, select_parameters
from .forward_mode import forward_over_reverse_hvp
from .graph_budget import (
    CPU_GRAPH_BUDGET,
    CUDA_GRAPH_FRACTION,
    GraphBudget,
    SavedBytes,
    check_budget,
)
from .preconditioned import MatrixPreconditionedOperator, PreconditionedOperator
from .probe import Probe, batch_tensors
from .reduction import PeerFailure, reduce_sum

__all__ = [
    "CPU_GRAPH_BUDGET",
    "CUDA_GRAPH_FRACTION",
    "GraphBudget",
    "HvpMethod",
    "LossFn",
    "MatrixPreconditionedOperator",
    "NonFiniteError",
    "PeerFailure",
    "PreconditionedOperator",
    "ProbeHessian",
    "flatten",
    "unflatten",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
HvpMethod = Literal["reverse_over_reverse", "forward_over_reverse"]


class NonFiniteError(ArithmeticError):
    """A loss, gradient or Hessian-vector product was NaN or infinite."""


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _world(process_group: dist.ProcessGroup | None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group=process_group)
    return 1


class ProbeHessian(CurvatureOperator):
    """Hessian of the sample-weighted probe loss with respect to (some of) the parameters.

    Args:
        model: the module whose parameters are differentiated (not a DDP wrapper).
        probe: the probe set (this rank's shard under DDP).
        loss_fn: ``loss_fn(model, batch)`` → mean loss over the batch.
        params: names of the parameters forming the operator's domain (a Hessian block);
            default: every parameter with ``requires_grad``.
        method: ``"reverse_over_reverse"`` (double backward, the default: it was the faster
            on every model in ``benchmarks/``) or ``"forward_over_reverse"`` (``torch.func``
            jvp of grad; it cannot run BatchNorm with batch statistics in train mode).
        reuse_graph: with ``reverse_over_reverse``, build each probe batch's first-order
            gradient graph once and reuse it for every product until the parameters change
            (:meth:`set_vector` or :meth:`release`). Each product then costs one
            double-backward pass instead of forward + backward + double backward, at the price
            of keeping the probe's activations alive for the operator's lifetime.
        graph_memory_budget: most bytes the kept graphs may take (their estimate
            :attr:`graph_bytes`, see the module doc); above it the operator does not keep
            graphs (:attr:`reuse_graph` turns ``False``). ``"auto"``: on CUDA
            :data:`CUDA_GRAPH_FRACTION` of the memory free for tensors when the graphs are
            built (the driver's free memory plus what PyTorch's allocator holds unused),
            elsewhere :data:`CPU_GRAPH_BUDGET`; ``None``: unlimited.
        process_group: group to reduce over when ``torch.distributed`` is initialised.

    Attributes:
        reuse_graph: whether products reuse kept graphs (``False`` after a fall-back).
        graph_bytes: the estimate of the kept graphs' size, ``None`` until first estimated.
        graph_fallback: why reuse was turned off (``None`` while it is on or never asked).
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        loss_fn: LossFn,
        *,
        params: Sequence[str] | None = None,
        method: HvpMethod = "reverse_over_reverse",
        reuse_graph: bool = True,
        graph_memory_budget: GraphBudget = "auto",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.graph_memory_budget = check_budget(graph_memory_budget)
        if method not in ("reverse_over_reverse", "forward_over_reverse"):
            raise ValueError(
                f"`method` must be 'reverse_over_reverse' or 'forward_over_reverse', got {method!r}"
            )
        wanted = None if params is None else set(params)
        if wanted is not None:
            known = {n for n, _ in model.named_parameters()}
            missing = sorted(wanted - known)
            if missing:
                raise ValueError(f"`params` names unknown parameters: {missing}")
        selected = select_parameters(
            model, None if wanted is None else (lambda name, _p: name in wanted)
        )
        self.model = model
        self.loss_fn = loss_fn
        self.probe = probe
        self.names: list[str] = list(selected)
        self.parameters: list[torch.Tensor] = list(selected.values())
        self._numel = sum(int(p.numel()) for p in self.parameters)
        self._home_device = self.parameters[0].device
        self.hvp_method: HvpMethod = method
        self.reuse_graph = bool(reuse_graph) and method == "reverse_over_reverse"
        self._graphs: list[tuple[torch.Tensor, ...]] | None = None
        self.graph_bytes: int | None = None
        self.graph_fallback: str | None = None
        self.process_group = process_group
        self.world_size = _world(process_group)
        count = torch.tensor(float(probe.num_samples), dtype=torch.float64, device=self.device)
        self.num_samples = int(self._all_reduce(count).item())
        self.matvecs = 0
        self.gradients = 0

    # -- reductions ------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    def _reduced(
        self, local: Callable[[], torch.Tensor], like: torch.Tensor, what: str
    ) -> torch.Tensor:
        """``local()`` reduced over ranks / N; an exception on one rank reaches all of them
        through the same reduction (:func:`~lightning_landscape.measures.reduction.reduce_sum`)."""
        total = reduce_sum(local, like, world_size=self.world_size, group=self.process_group)
        return self._checked(total / self.num_samples, what)

    @staticmethod
    def _checked(total: torch.Tensor, what: str) -> torch.Tensor:
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteError(f"non-finite {what} on the probe")
        return total

    # -- the operator interface ------------------------------------------------------------
    @property
    def size(self) -> int:
        """Length of the operator's vectors: the number of elements of :attr:`parameters`."""
        return self._numel

    @property
    def device(self) -> torch.device:
        """The device of the (first) parameter, where products are computed."""
        return self._home_device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of vectors and results: the parameters', float32 for half precision
        (products are computed in the parameters' dtype, the solvers work in float32)."""
        own = self.parameters[0].dtype if self.parameters else torch.float32
        return torch.float32 if own in (torch.float16, torch.bfloat16) else own

    def _split_as_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``v`` cut into tensors shaped (and typed) like :attr:`parameters`."""
        return [t.to(p.dtype) for t, p in zip(unflatten(v, self.parameters), self.parameters)]

    # -- products --------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` on the whole probe (sample-weighted, reduced over ranks)."""
        if v.shape != (self._numel,):
            raise ValueError(f"expected vector of shape ({self._numel},), got {tuple(v.shape)}")

        def local() -> torch.Tensor:
            total = torch.zeros_like(v)
            v_split = self._split_as_params(v)
            if self.reuse_graph and self._graphs is None:
                self._graphs = self._build_graphs()
            if self.reuse_graph and self._graphs is not None:
                for grads, n in zip(self._graphs, self.probe.sizes):
                    total.add_(self._second_backward(grads, v_split, retain=True), alpha=n)
            else:
                for batch, n in self.probe.weighted():
                    total.add_(self._hvp(v_split, batch), alpha=n)
            return total

        self.matvecs += 1
        return self._reduced(local, v, "Hessian-vector product")

    def release(self) -> None:
        """Drop the cached gradient graphs (they are rebuilt on the next product)."""
        self._graphs = None

    def _budget_bytes(self) -> float:
        budget = self.graph_memory_budget
        if budget is None:
            return math.inf
        if budget != "auto":
            return float(budget)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device)
            cached -= torch.cuda.memory_allocated(self.device)
            return CUDA_GRAPH_FRACTION * (free + cached)
        return float(CPU_GRAPH_BUDGET)

    def _fall_back(self, why: str) -> None:
        self.reuse_graph = False
        self.graph_fallback = why

    def _build_graphs(self) -> list[tuple[torch.Tensor, ...]] | None:
        """Every probe batch's first-order graph, or ``None`` (and no reuse) if they don't fit."""
        budget = self._budget_bytes()
        batches = self.probe.batches
        known = [*self.model.parameters(), *self.model.buffers(), *batch_tensors(batches[0])]
        counter = SavedBytes(known)
        ran_out = False
        try:
            with counter.hooks():
                graphs = [self._gradient_graph(batches[0])]
            per_batch = sum(g.numel() * g.element_size() for g in graphs[0])
            scale = self.probe.num_samples / self.probe.sizes[0]
            self.graph_bytes = int(counter.bytes * scale) + per_batch * len(batches)
            if self.graph_bytes > budget:
                graphs.clear()
                self._fall_back(
                    f"kept graphs would take ~{self.graph_bytes} bytes, over the budget of "
                    f"{int(budget)} (graph_memory_budget={self.graph_memory_budget!r})"
                )
                return None
            graphs.extend(self._gradient_graph(batch) for batch in batches[1:])
        except torch.cuda.OutOfMemoryError:
            ran_out = True  # leave the handler first: its traceback holds the partial graphs
        if ran_out:
            graphs = []
            self._fall_back("out of memory while building the graphs")
            return None
        return graphs

    def _gradient_graph(self, batch: Any) -> tuple[torch.Tensor, ...]:
        loss = self.loss_fn(self.model, batch)
        grads = torch.autograd.grad(loss, self.parameters, create_graph=True, allow_unused=True)
        return tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.parameters)
        )

    def _second_backward(
        self, grads: tuple[torch.Tensor, ...], v_split: list[torch.Tensor], *, retain: bool
    ) -> torch.Tensor:
        pairs = [(g, v) for g, v in zip(grads, v_split) if g.requires_grad]
        if not pairs:  # the loss is linear in the parameters
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        hvp = torch.autograd.grad(
            [g for g, _ in pairs],
            self.parameters,
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain,
            allow_unused=True,
        )
        return torch.cat(
            [
                (torch.zeros_like(p) if h is None else h).reshape(-1)
                for h, p in zip(hvp, self.parameters)
            ]
        )

    def _hvp(self, v_split: list[torch.Tensor], batch: Any) -> torch.Tensor:
        if self.hvp_method == "forward_over_reverse":
            try:
                return self._hvp_forward_over_reverse(v_split, batch)
            except RuntimeError as err:
                if "ZeroTensors are immutable" not in str(err):
                    raise
                # a torch bug in the forward-mode derivative of some losses (F.mse_loss among
                # them): the same product by double backward, for the rest of this operator
                warnings.warn(
                    "ProbeHessian(method='forward_over_reverse'): torch cannot take the "
                    f"forward-mode derivative of this loss ({err}); using "
                    "reverse_over_reverse instead.",
                    UserWarning,
                    stacklevel=2,
                )
                self.hvp_method = "reverse_over_reverse"
        return self._second_backward(self._gradient_graph(batch), v_split, retain=False)

    def _hvp_forward_over_reverse(self, v_split: list[torch.Tensor], batch: Any) -> torch.Tensor:
        params = dict(zip(self.names, self.parameters))
        return forward_over_reverse_hvp(self.model, self.loss_fn, params, v_split, batch)

    def loss(self) -> float:
        """The probe loss (sample-weighted, reduced over ranks)."""
        like = torch.zeros((), dtype=self.dtype, device=self.device)

        def local() -> torch.Tensor:
            total = like.clone()
            with torch.no_grad():
                for batch, n in self.probe.weighted():
                    total += n * self.loss_fn(self.model, batch).detach().to(self.dtype)
            return total

        return float(self._reduced(local, like, "loss").item())

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The probe loss and its gradient (flat, in the operator's parameter order)."""
        like = torch.zeros(self.size + 1, dtype=self.dtype, device=self.device)

        def local() -> torch.Tensor:
            total = like.clone()
            for batch, n in self.probe.weighted():
                loss = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
                flat = torch.cat(
                    [
                        torch.zeros(p.numel(), dtype=self.dtype, device=self.device)
                        if g is None
                        else g.reshape(-1).to(self.dtype)
                        for g, p in zip(grads, self.parameters)
                    ]
                )
                total[:-1].add_(flat, alpha=n)
                total[-1] += n * loss.detach().to(self.dtype)
            return total

        self.gradients += 1
        total = self._reduced(local, like, "loss or gradient")
        return float(total[-1].item()), total[:-1]

    def vector(self) -> torch.Tensor:
        """Current parameter values, flat (a detached copy in the operator's dtype)."""
        return flatten([p.detach() for p in self.parameters]).to(self.dtype).clone()

    def set_vector(self, vector: torch.Tensor) -> None:
        """Overwrite the parameters with ``vector`` (callers run inside :func:`guard`)."""
        self.release()
        with torch.no_grad():
            for p, value in zip(self.parameters, unflatten(vector, self.parameters)):
                p.copy_(value)
