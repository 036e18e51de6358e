"""Hessian-vector products by forward-over-reverse differentiation (``torch.func``).

``jvp(grad(loss))`` computes ``H v`` in one forward-mode pass over the gradient, without
keeping a first-order graph; :class:`~lightning_landscape.measures.operators.ProbeHessian`
uses it for ``method="forward_over_reverse"``. Parameters outside the operator's domain and
the buffers are held fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["forward_over_reverse_hvp"]


class _LossModule(nn.Module):
    """``functional_call`` target: evaluates ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def forward_over_reverse_hvp(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    v_split: list[torch.Tensor],
    batch: Any,
) -> torch.Tensor:
    """``H v`` of ``loss_fn(model, batch)`` w.r.t. ``params`` (name → parameter), flat.

    ``v_split`` holds ``v`` split like the parameters, in ``params``' order.
    """
    wrapper = _LossModule(model, loss_fn)
    fixed: dict[str, torch.Tensor] = {
        f"model.{n}": p for n, p in model.named_parameters() if n not in params
    }
    fixed.update({f"model.{n}": b for n, b in model.named_buffers()})

    def loss_of(free: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, {**fixed, **free}, (batch,))

    primals = {f"model.{n}": p.detach() for n, p in params.items()}
    tangents = {k: t for k, t in zip(primals, v_split)}
    hvp = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))[1]
    return torch.cat([hvp[k].reshape(-1) for k in primals])
