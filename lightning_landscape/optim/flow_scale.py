"""How far one optimizer step moves along the gradient flow it discretises, read from profiles.

Pure torch. :func:`effective_scale` is ``κ`` (one step of learning rate ``η`` is an Euler step
of the flow of length ``κη``); :func:`bias_factor` turns the profile's diagonal ``P``
(:attr:`~lightning_landscape.optim.profile.OptimizerProfile.stability`) into the preconditioner
of the flow by undoing explicit bias corrections. Both read the optimizer's
:class:`~lightning_landscape.optim.profile.OptimizerProfile`
(:attr:`~lightning_landscape.optim.profile.OptimizerProfile.effective_scale`,
:attr:`~lightning_landscape.optim.profile.OptimizerProfile.bias_correction`). Used by
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

from .profile import profile_for

__all__ = ["bias_factor", "effective_scale"]


def effective_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """``κ``: one step of learning rate ``η`` is an Euler step of the flow of length ``κη``.

    ``κ`` is the steady-state ratio of the update direction to the gradient (constant
    gradient, momentum buffers converged): SGD heavy ball ``(1−d)/(1−β)``, Nesterov
    ``1/(1−β)``, plain SGD, Adam/AdamW (bias-corrected), RSG and ARSG ``1``, NovoGrad
    ``s/(1−β1)``. ``None`` for an optimizer without a profile or without a flow rule, SGD with
    ``d = 1``, or param groups that disagree on these hyperparameters.
    """
    profile = profile_for(optimizer)
    return None if profile is None else profile.kappa(optimizer)


def bias_factor(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any]
) -> float:
    """Factor turning the profile's ``P`` into the flow's: undo explicit bias corrections."""
    profile = profile_for(optimizer)
    return 1.0 if profile is None else profile.flow_factor(optimizer, group, state)
