"""The gradient flow an optimizer discretises, read from its profile (``GradientFlowDeviation``).

Everything comes from the optimizer's
:class:`~lightning_landscape.optim.profile.OptimizerProfile`: ``P`` from its ``stability``
(other groups' lr folded in), the effective step ``κ``, the bias corrections undone on ``P`` and
the weight-decay kind of each param group, as a
:class:`~lightning_landscape.measures.gradient_flow.Flow`.
"""

from __future__ import annotations

import torch

from lightning_landscape.measures.gradient_flow import Flow
from lightning_landscape.optim.flow_scale import effective_scale
from lightning_landscape.optim.profile import WeightDecay, profile_for

__all__ = ["effective_scale", "optimizer_flow"]


def optimizer_flow(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> tuple[Flow | None, str] | None:
    """The flow ``optimizer`` discretises on ``params`` at its current state: ``(flow, rule)``.

    ``P`` is the profile's (other groups' lr folded in) with explicit bias corrections undone;
    weight decay is coupled (L2, ``WeightDecay.COUPLED``: SGD, Adam, RSG, ARSG) or applied after
    preconditioning (``DECOUPLED``: AdamW; ``PRECONDITIONED``: NovoGrad). ``flow`` is ``None``
    while ``P`` is not available (Adam before its first step) or not supported (an operator
    ``P``: K-FAC); ``None`` when no rule is known (no profile, or no ``κ``).
    """
    profile = profile_for(optimizer)
    if profile is None:
        return None
    stab = profile.stability(optimizer, list(params))
    if stab is None or profile.kappa(optimizer) is None:
        return None
    if stab.inverse_sqrt is not None or profile.operator:
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
        kind = None if g is None else profile.decay_kind(optimizer, g)
        after = kind is WeightDecay.DECOUPLED or kind is WeightDecay.PRECONDITIONED
        c_val, d_val = (0.0, wd * ratio) if after else (wd, 0.0)
        if kind is WeightDecay.NONE:
            c_val = d_val = 0.0
        coupled.append(torch.full((p.numel(),), c_val, dtype=torch.float64, device=p.device))
        decoupled.append(torch.full((p.numel(),), d_val, dtype=torch.float64, device=p.device))
        if stab.preconditioner is not None:
            factor = (
                1.0 if g is None else profile.flow_factor(optimizer, g, optimizer.state.get(p, {}))
            )
            diag.append(stab.preconditioner[i].detach().reshape(-1).double() * factor)
    c, d = torch.cat(coupled), torch.cat(decoupled)
    flow = Flow(
        inverse=torch.cat(diag).reciprocal() if diag else None,
        coupled=c if bool(c.any()) else None,
        decoupled=d if bool(d.any()) else None,
    )
    return flow, stab.rule
