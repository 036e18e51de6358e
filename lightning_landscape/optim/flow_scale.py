"""How far one optimizer step moves along the gradient flow it discretises, per optimizer.

Pure torch. :func:`effective_scale` is ``κ`` (one step of learning rate ``η`` is an Euler step
of the flow of length ``κη``); :func:`bias_factor` turns the stability registry's diagonal
``P`` (:mod:`lightning_landscape.optim.stability`) into the preconditioner of the flow by
undoing explicit bias corrections. Used by
:class:`~lightning_landscape.callbacks.gradient_flow.GradientFlowDeviation`.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> effective_scale(torch.optim.SGD([w], lr=0.1, momentum=0.9))  # heavy ball: 1/(1−β)
    10.000000000000002
"""

from __future__ import annotations

from typing import Any

import torch

from .novograd import NovoGrad
from .rsg import ARSG, RSG

__all__ = ["bias_factor", "effective_scale"]


def effective_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """``κ``: one step of learning rate ``η`` is an Euler step of the flow of length ``κη``.

    ``κ`` is the steady-state ratio of the update direction to the gradient (constant
    gradient, momentum buffers converged): SGD heavy ball ``(1−d)/(1−β)``, Nesterov
    ``1/(1−β)``, plain SGD, Adam/AdamW (bias-corrected), RSG and ARSG ``1``, NovoGrad
    ``s/(1−β1)``. ``None`` for an optimizer without a known rule, SGD with ``d = 1``, or param
    groups that disagree on these hyperparameters.
    """
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        keys = {(g.get("momentum", 0), g.get("dampening", 0), g.get("nesterov", 0)) for g in groups}
        beta, damp, nesterov = (float(k) for k in keys.pop())
        if keys or damp >= 1.0 and beta > 0.0:
            return None
        return 1.0 / (1.0 - beta) if nesterov else (1.0 - damp * (beta > 0)) / (1.0 - beta)
    if isinstance(optimizer, (torch.optim.Adam, RSG, ARSG)):
        return 1.0
    if isinstance(optimizer, NovoGrad):  # m ← β1 m + s(g/P + dθ): m → s(g/P + dθ)/(1−β1)
        betas = {(float(g["betas"][0]), bool(g["grad_averaging"])) for g in groups}
        beta1, averaging = betas.pop()
        return None if betas else (1.0 if averaging else 1.0 / (1.0 - beta1))
    return None


def bias_factor(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any]
) -> float:
    """Factor turning the registry's ``P`` into the flow's: undo explicit bias corrections."""
    t = float(state.get("step", 0))
    if t <= 0:
        return 1.0
    beta1 = float(group["betas"][0]) if "betas" in group else 0.0
    if isinstance(optimizer, torch.optim.Adam):  # P = (1−β1^t)(...): m/(1−β1^t) ≈ g
        return 1.0 / (1.0 - beta1**t)
    if isinstance(optimizer, ARSG) and not group["amsgrad"]:  # P = (...)/k_t
        mu = float(group["observation"])
        return (1.0 - mu) / (1.0 - beta1**t) + mu
    return 1.0
