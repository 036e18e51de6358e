"""The gradient flow an optimizer discretises, read from its state (``GradientFlowDeviation``).

Built from :func:`~lightning_landscape.optim.stability.stability_of` (its ``P``) and
:mod:`~lightning_landscape.optim.flow_scale` (effective step, bias corrections), as a
:class:`~lightning_landscape.measures.gradient_flow.Flow`.
"""

from __future__ import annotations

import torch

from lightning_landscape.measures.gradient_flow import Flow
from lightning_landscape.optim import NovoGrad
from lightning_landscape.optim.flow_scale import bias_factor, effective_scale
from lightning_landscape.optim.stability import stability_of
from lightning_landscape.optim.stability_kfac import attached_kfac

__all__ = ["effective_scale", "optimizer_flow"]


def optimizer_flow(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> tuple[Flow | None, str] | None:
    """The flow ``optimizer`` discretises on ``params`` at its current state: ``(flow, rule)``.

    ``P`` is :func:`~lightning_landscape.optim.stability.stability_of`'s (other groups' lr folded
    in) with explicit bias corrections undone; weight decay is coupled (L2: SGD, Adam, RSG,
    ARSG) or decoupled (AdamW, NovoGrad). ``flow`` is ``None`` while ``P`` is not available
    (Adam before its first step) or not supported (K-FAC); ``None`` when no rule is known.
    """
    stab = stability_of(optimizer, params)
    if stab is None or effective_scale(optimizer) is None:
        return None
    if stab.inverse_sqrt is not None or attached_kfac(optimizer) is not None:
        return None, "not supported with K-FAC's non-diagonal preconditioner"
    if stab.preconditioned and stab.preconditioner is None:
        return None, "the optimizer has no state yet (before its first step)"
    eta_ref = float(optimizer.param_groups[0]["lr"])
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    diag, coupled, decoupled = [], [], []
    for i, p in enumerate(params):
        g = owner.get(id(p))
        wd = 0.0 if g is None else float(g.get("weight_decay", 0.0))
        ratio = 0.0 if g is None else float(g["lr"]) / eta_ref
        decoupled_kind = g is not None and (
            isinstance(optimizer, NovoGrad)
            or isinstance(optimizer, torch.optim.Adam)
            and bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        )
        c_val, d_val = (0.0, wd * ratio) if decoupled_kind else (wd, 0.0)
        coupled.append(torch.full((p.numel(),), c_val, dtype=torch.float64, device=p.device))
        decoupled.append(torch.full((p.numel(),), d_val, dtype=torch.float64, device=p.device))
        if stab.preconditioner is not None:
            factor = 1.0 if g is None else bias_factor(optimizer, g, optimizer.state.get(p, {}))
            diag.append(stab.preconditioner[i].detach().reshape(-1).double() * factor)
    c, d = torch.cat(coupled), torch.cat(decoupled)
    flow = Flow(
        inverse=torch.cat(diag).reciprocal() if diag else None,
        coupled=c if bool(c.any()) else None,
        decoupled=d if bool(d.any()) else None,
    )
    return flow, stab.rule
