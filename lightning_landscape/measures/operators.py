"""Hessian-vector products of the probe loss, built on hessian-eigenthings.

:class:`ProbeHessian` is the Hessian of the probe loss

.. math:: L(θ) = \\frac{1}{N} \\sum_{\\text{ranks}} \\sum_b n_b \\, \\ell_b(θ)

where ``ℓ_b`` is the mean loss of probe batch ``b`` (``n_b`` samples) and ``N`` the number of
probe samples on all ranks. It extends ``hessian_eigenthings.HessianOperator`` (whose
double-backward HVP it reuses) in two ways that matter for correct numbers:

- batches are weighted by their sample counts (the library averages batches uniformly);
- under ``torch.distributed`` the weighted *sums* are all-reduced once per product, so every
  rank holds the Hessian of the union of all probe shards (every rank must call ``matvec``
  the same number of times: the solvers are deterministic given the same seed).

A non-finite loss, gradient or product raises :class:`NonFiniteError` *after* the reduction, so
all ranks see the same value and skip together instead of deadlocking.

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

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ._compat import CurvatureOperator, HessianOperator
from .probe import Probe

__all__ = [
    "HvpMethod",
    "LossFn",
    "MatrixPreconditionedOperator",
    "NonFiniteError",
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


class _LossModule(nn.Module):
    """``functional_call`` target: evaluates ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class ProbeHessian(HessianOperator):
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
        process_group: group to reduce over when ``torch.distributed`` is initialised.
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
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
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
        super().__init__(
            model,
            probe.batches,
            loss_fn,
            param_filter=None if wanted is None else (lambda name, _p: name in wanted),
        )
        self.probe = probe
        self.names: list[str] = list(self._params)
        self.parameters: list[torch.Tensor] = self._param_list
        self.hvp_method: HvpMethod = method
        self.reuse_graph = bool(reuse_graph) and method == "reverse_over_reverse"
        self._graphs: list[tuple[torch.Tensor, ...]] | None = None
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

    def _finish(self, total: torch.Tensor, what: str) -> torch.Tensor:
        total = self._all_reduce(total) / self.num_samples
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteError(f"non-finite {what} on the probe")
        return total

    # -- products --------------------------------------------------------------------------
    def _matvec_full(self, v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(v)
        v_split = self._split(v)
        if self.reuse_graph:
            if self._graphs is None:
                self._graphs = [self._gradient_graph(batch) for batch in self.probe.batches]
            for grads, n in zip(self._graphs, self.probe.sizes):
                total.add_(self._second_backward(grads, v_split, retain=True), alpha=n)
        else:
            for batch, n in self.probe.weighted():
                total.add_(self._hvp(v_split, batch), alpha=n)
        self.matvecs += 1
        return self._finish(total, "Hessian-vector product")

    def release(self) -> None:
        """Drop the cached gradient graphs (they are rebuilt on the next product)."""
        self._graphs = None

    def _gradient_graph(self, batch: Any) -> tuple[torch.Tensor, ...]:
        loss = self.loss_fn(self.model, batch)
        grads = torch.autograd.grad(loss, self._param_list, create_graph=True, allow_unused=True)
        return tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._param_list)
        )

    def _second_backward(
        self, grads: tuple[torch.Tensor, ...], v_split: list[torch.Tensor], *, retain: bool
    ) -> torch.Tensor:
        pairs = [(g, v) for g, v in zip(grads, v_split) if g.requires_grad]
        if not pairs:  # the loss is linear in the parameters
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        hvp = torch.autograd.grad(
            [g for g, _ in pairs],
            self._param_list,
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain,
            allow_unused=True,
        )
        return torch.cat(
            [
                (torch.zeros_like(p) if h is None else h).reshape(-1)
                for h, p in zip(hvp, self._param_list)
            ]
        )

    def _hvp(self, v_split: list[torch.Tensor], batch: Any) -> torch.Tensor:
        if self.hvp_method == "forward_over_reverse":
            return self._hvp_forward_over_reverse(v_split, batch)
        return self._second_backward(self._gradient_graph(batch), v_split, retain=False)

    def _hvp_forward_over_reverse(self, v_split: list[torch.Tensor], batch: Any) -> torch.Tensor:
        wrapper = _LossModule(self.model, self.loss_fn)
        fixed = {f"model.{n}": p for n, p in self.model.named_parameters() if n not in self._params}
        fixed.update({f"model.{n}": b for n, b in self.model.named_buffers()})

        def loss_of(free: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(wrapper, {**fixed, **free}, (batch,))

        primals = {f"model.{n}": p.detach() for n, p in self._params.items()}
        tangents = {k: t for k, t in zip(primals, v_split)}
        hvp = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))[1]
        return torch.cat([hvp[k].reshape(-1) for k in primals])

    def loss(self) -> float:
        """The probe loss (sample-weighted, reduced over ranks)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for batch, n in self.probe.weighted():
                total += n * self.loss_fn(self.model, batch).detach().to(self.dtype)
        return float(self._finish(total, "loss").item())

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The probe loss and its gradient (flat, in the operator's parameter order)."""
        total = torch.zeros(self.size + 1, dtype=self.dtype, device=self.device)
        for batch, n in self.probe.weighted():
            loss = self.loss_fn(self.model, batch)
            grads = torch.autograd.grad(loss, self._param_list, allow_unused=True)
            flat = torch.cat(
                [
                    torch.zeros(p.numel(), dtype=self.dtype, device=self.device)
                    if g is None
                    else g.reshape(-1)
                    for g, p in zip(grads, self._param_list)
                ]
            )
            total[:-1].add_(flat, alpha=n)
            total[-1] += n * loss.detach()
        self.gradients += 1
        total = self._finish(total, "loss or gradient")
        return float(total[-1].item()), total[:-1]

    def vector(self) -> torch.Tensor:
        """Current parameter values, flat (a detached copy)."""
        return flatten([p.detach() for p in self._param_list]).clone()

    def set_vector(self, vector: torch.Tensor) -> None:
        """Overwrite the parameters with ``vector`` (callers run inside :func:`guard`)."""
        self.release()
        with torch.no_grad():
            for p, value in zip(self._param_list, unflatten(vector, self._param_list)):
                p.copy_(value)


class PreconditionedOperator(CurvatureOperator):
    """``u ↦ P^{-1/2} H P^{-1/2} u`` for a positive diagonal preconditioner ``P``.

    Its eigenvalues are those of ``P^{-1} H`` (the operator is symmetric, so Lanczos applies).
    Entries of ``P`` equal to ``+inf`` (parameters the optimizer never moves) give zero rows.

    Args:
        operator: the Hessian operator ``H``.
        diagonal: ``P`` as a flat vector in the operator's parameter order.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (operator.size,):
            raise ValueError(
                f"`diagonal` must have shape ({operator.size},), got {tuple(diagonal.shape)}"
            )
        if bool((diagonal <= 0).any()) or bool(torch.isnan(diagonal).any()):
            raise ValueError("`diagonal` must be positive (a diagonal preconditioner)")
        self.operator = operator
        self.scale = diagonal.to(device=operator.device, dtype=operator.dtype).rsqrt()

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * self.operator.matvec(self.scale * v)


class MatrixPreconditionedOperator(CurvatureOperator):
    """``u ↦ S H S u`` with ``S = P^{-1/2}`` of a symmetric positive definite ``P`` (any matrix).

    The non-diagonal counterpart of :class:`PreconditionedOperator` (K-FAC's Kronecker blocks):
    its eigenvalues are those of ``P^{-1} H``. ``S`` comes as a function on flat vectors and
    must be linear and symmetric (not checked).

    Args:
        operator: the Hessian operator ``H``.
        inverse_sqrt: ``v ↦ P^{-1/2} v`` on flat vectors in the operator's parameter order.
    """

    def __init__(
        self, operator: CurvatureOperator, inverse_sqrt: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        if not callable(inverse_sqrt):
            raise ValueError(f"`inverse_sqrt` must be callable, got {inverse_sqrt!r}")
        self.operator = operator
        self.inverse_sqrt = inverse_sqrt

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        out = self.inverse_sqrt(v)
        if out.shape != v.shape:
            raise ValueError(
                f"`inverse_sqrt` must return a vector of shape {tuple(v.shape)}, "
                f"got {tuple(out.shape)}"
            )
        return out.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(self.operator.matvec(self._apply(v)))
