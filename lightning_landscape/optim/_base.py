"""Plumbing shared by the package's optimizers: validation, closure, state dtypes, dispatch.

Every optimizer of :mod:`lightning_landscape.optim` subclasses :class:`LandscapeOptimizer`, which
gives them the torch.optim conventions in one place:

- hyperparameters are validated per param group (defaults *and* per-group overrides) with a
  ``ValueError`` that names the argument and its value;
- ``step(closure)`` runs the closure under ``torch.enable_grad()`` and returns its loss;
- ``p.grad`` is only read; parameters without a gradient are skipped;
- the state of float16/bfloat16 parameters is kept in float32 (:func:`state_dtype`), also across
  ``load_state_dict``, which torch would otherwise cast to the parameter's dtype;
- ``foreach=None`` selects the ``torch._foreach_*`` path when every parameter of the group is on
  a CUDA device, the readable single-tensor path otherwise (RSG and ARSG: also on CPU, where
  their foreach path runs over cache-sized buckets, :func:`cache_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lightning_landscape.checks import check_number, check_that

__all__ = [
    "LandscapeOptimizer",
    "check_beta",
    "check_betas",
    "check_nonneg",
    "check_positive",
    "cache_blocks",
    "group_by_device_and_dtype",
    "state_dtype",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Dtype of an optimizer state tensor for ``param``: float32 for 16-bit floats, else its own."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _real(name: str, value: Any) -> Any:
    """``value``, or the number a one-element tensor holds (hyperparameters may be tensors)."""
    if isinstance(value, torch.Tensor):
        check_that(name, value, value.numel() == 1, "a number or a one-element tensor")
        return float(value)
    return value


def check_nonneg(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``0 <= value < inf`` (a number or a one-element tensor)."""
    check_number(name, _real(name, value), include_low=True)


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``0 < value < inf`` (a number or a one-element tensor)."""
    check_number(name, _real(name, value))


def check_beta(name: str, value: Any, *, closed: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` lies in ``[0, 1)`` (``[0, 1]`` if ``closed``)."""
    check_number(name, _real(name, value), high=1.0, include_low=True, include_high=closed)


def check_betas(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a pair of numbers in ``[0, 1)``."""
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    check_that("betas", value, pair, "a pair (beta1, beta2)")
    check_beta("betas[0]", value[0])
    check_beta("betas[1]", value[1])


def group_by_device_and_dtype(
    *lists: list[Any],
) -> list[tuple[list[Any], ...]]:
    """Split parallel lists into buckets whose first-list tensors share device and dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Any], ...]] = {}
    for i, p in enumerate(lists[0]):
        bucket = buckets.setdefault((p.device, p.dtype), tuple([] for _ in lists))
        for out, src in zip(bucket, lists):
            out.append(src[i])
    return list(buckets.values())


CACHE_BLOCK = 1 << 18  # elements per block: ~1 MB of float32 per tensor, 5 tensors in L2/L3


def cache_blocks(
    lists: list[list[torch.Tensor]], block: int = CACHE_BLOCK
) -> list[tuple[list[int], list[list[torch.Tensor]]]]:
    """Parallel tensor lists cut into buckets of about ``block`` elements, for CPU foreach steps.

    On CPU a ``torch._foreach_*`` op is a loop over its tensors, so a step of ``k`` ops streams
    every state tensor through memory ``k`` times; running the ops bucket by bucket keeps a
    bucket's slices of parameter, gradient and state in cache between ops. A tensor whose
    parallel tensors are all contiguous is cut into flat views of ``block`` elements (element
    ``i`` of every list gets the same slice); small tensors are gathered whole. Elementwise
    steps give the same bits either way (every element sees the same operations).

    Returns:
        ``[(indices, lists)]``: per bucket the index into the input lists of each entry, and
        the parallel lists of views.
    """
    out: list[tuple[list[int], list[list[torch.Tensor]]]] = []
    idx: list[int] = []
    cur: list[list[torch.Tensor]] = [[] for _ in lists]
    size = 0
    for i, ts in enumerate(zip(*lists)):
        n = ts[0].numel()
        if n > block and all(t.is_contiguous() and t.numel() == n for t in ts):
            flat = [t.view(-1) for t in ts]
            pieces = [[f[s : s + block] for f in flat] for s in range(0, n, block)]
        else:
            pieces = [list(ts)]
        for piece in pieces:
            idx.append(i)
            for c, t in zip(cur, piece):
                c.append(t)
            size += piece[0].numel()
            if size >= block:
                out.append((idx, cur))
                idx, cur, size = [], [[] for _ in lists], 0
    if idx:
        out.append((idx, cur))
    return out


class LandscapeOptimizer(torch.optim.Optimizer):
    """Base class: per-group validation, closure, low-precision state and foreach dispatch.

    Subclasses implement :meth:`_validate` (raise ``ValueError`` for a bad group),
    :meth:`_init_state` (create the state of one parameter) and :meth:`_update` (one step of
    one param group, given the parameters that have a gradient).
    """

    #: ``foreach=None`` also picks the foreach path on CPU (one whose CPU foreach path runs over
    #: :func:`cache_blocks` buckets: faster than its single-tensor path, with the same bits)
    _foreach_on_cpu = False

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, foreach: bool | None
    ) -> None:
        super().__init__(params, {**defaults, "foreach": foreach})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after validating its hyperparameters (defaults filled in)."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_nonneg("lr", merged["lr"])
        if merged["foreach"] is not None and not isinstance(merged["foreach"], bool):
            raise ValueError(f"`foreach` must be None, True or False, got {merged['foreach']!r}")
        self._validate(merged)
        super().add_param_group(param_group)

    # -- state --------------------------------------------------------------------------------
    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch's ``load_state_dict``, keeping float32 state for 16-bit parameters.

        ``torch.optim.Optimizer`` casts every floating state tensor to its parameter's dtype;
        for float16/bfloat16 parameters the saved float32 values are put back unrounded.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if p.dtype not in _LOW_PRECISION or pid not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][pid].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32).clone()

    # -- step ---------------------------------------------------------------------------------
    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        foreach: bool,
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss; it is
                run under ``torch.enable_grad()``.

        Returns:
            The closure's return value, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                params.append(p)
                grads.append(p.grad)
            if not params:
                continue
            states = []
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p] = self._init_state(p, group)
                states.append(self.state[p])
            foreach = group["foreach"]
            if foreach is None:
                on_cpu = self._foreach_on_cpu and all(p.device.type == "cpu" for p in params)
                foreach = (
                    on_cpu or all(p.is_cuda for p in params)
                ) and not torch.jit.is_scripting()
            self._update(group, params, grads, states, bool(foreach))
        return loss
