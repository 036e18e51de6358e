"""Profiles of torch's optimizers: ``torch.optim.SGD``, ``Adam`` and ``AdamW``.

Conventions (lr ratios folded into ``P``, ``+inf`` for unmanaged or frozen parameters,
``None`` when the momentum-type hyperparameters disagree over the active groups, for
``maximize`` and complex parameters) are those of :mod:`lightning_landscape.optim.stability`.
Importing :mod:`lightning_landscape.optim` registers these profiles.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    >>> s = sgd_stability(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1), [w])
    >>> s.momentum, s.weight_decay.value
    (Momentum(form='heavy_ball', beta=0.9, dampening=0.0, observation=0.0), 'coupled')
    >>> SGD_PROFILE.kappa(torch.optim.SGD([w], lr=0.1, momentum=0.5))  # 1/(1−β)
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .profile import Momentum, OptimizerProfile, Stability, WeightDecay, register_optimizer
from .profile_tools import agree, coupled_decay, decay_kind, lr_scale, setup, wd_note

__all__ = [
    "ADAM_PROFILE",
    "SGD_PROFILE",
    "adam_bias_correction",
    "adam_decay_kind",
    "adam_stability",
    "sgd_effective_scale",
    "sgd_stability",
]


# --------------------------------------------------------------------------- torch.optim.SGD


def sgd_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of ``torch.optim.SGD``: plain, heavy ball, damped heavy ball, Nesterov.

    With ``buf = β buf + (1−d) g`` (torch's buffer; the first step copies ``g``, a transient):

    - ``β = 0``: ``u = g``, threshold ``2/η``;
    - heavy ball ``u = buf``: writing ``buf = (1−d)·b`` with ``b = β b + g`` turns it into the
      undamped heavy ball with step ``(1−d)η``, hence ``(2+2β)/((1−d)η)`` (``d = 0``:
      ``(2+2β)/η``; ``d = 1``: ``+inf``, the buffer ignores curvature);
    - Nesterov ``u = g + β buf`` (torch forbids dampening): ``(2+2β)/((1+2β)η)``.

    ``None`` when β, d or nesterov differ over the active groups, or ``β >= 1`` or ``d`` is
    outside ``[0, 1]``.
    """
    found = setup(optimizer, params, ("momentum", "dampening", "nesterov"))
    if found is None:
        return None
    eta_ref, groups, active, hyper = found
    beta = float(hyper.get("momentum", 0.0))
    damp = float(hyper.get("dampening", 0.0))
    nesterov = bool(hyper.get("nesterov", False))
    if not 0.0 <= beta < 1.0 or not 0.0 <= damp <= 1.0:
        return None
    if beta == 0.0:
        momentum = Momentum("none")
        rule = f"plain GD 2/η, η={eta_ref:g}"
    elif nesterov:
        momentum = Momentum("nesterov", beta=beta)
        rule = f"Nesterov (2+2β)/((1+2β)η), β={beta:g}, η={eta_ref:g}"
    elif damp == 0.0:
        momentum = Momentum("heavy_ball", beta=beta)
        rule = f"heavy ball (2+2β)/η, β={beta:g}, η={eta_ref:g}"
    else:
        momentum = Momentum("heavy_ball", beta=beta, dampening=damp)
        rule = f"damped heavy ball (2+2β)/((1−d)η), β={beta:g}, d={damp:g}, η={eta_ref:g}"
    threshold = momentum.threshold(eta_ref)
    rule += wd_note(active, decoupled=False)
    kind = decay_kind(active, WeightDecay.COUPLED)

    scales = [lr_scale(g, eta_ref) for g in groups]
    decay = coupled_decay(params, groups)
    if all(s == 1.0 for s in scales):
        return Stability(
            threshold, False, None, rule, coupled_decay=decay, momentum=momentum, weight_decay=kind
        )
    precond = [
        torch.full(p.shape, s, dtype=p.dtype, device=p.device) for p, s in zip(params, scales)
    ]
    return Stability(
        threshold, True, precond, rule + "; per-group lr in P", coupled_decay=decay,
        momentum=momentum, weight_decay=kind,
    )  # fmt: skip


def sgd_effective_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """``κ`` of SGD: heavy ball ``(1−d)/(1−β)``, Nesterov ``1/(1−β)``, plain 1.

    ``None`` for ``d = 1`` with momentum or param groups that disagree on β, d or nesterov.
    """
    groups = optimizer.param_groups
    keys = {(g.get("momentum", 0), g.get("dampening", 0), g.get("nesterov", 0)) for g in groups}
    beta, damp, nesterov = (float(k) for k in keys.pop())
    if keys or damp >= 1.0 and beta > 0.0:
        return None
    return 1.0 / (1.0 - beta) if nesterov else (1.0 - damp * (beta > 0)) / (1.0 - beta)


SGD_PROFILE = OptimizerProfile(
    name="torch.optim.SGD",
    stability=sgd_stability,
    effective_scale=sgd_effective_scale,
    weight_decay=WeightDecay.COUPLED,
)


# ----------------------------------------------------------------- torch.optim.Adam / AdamW


def adam_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of ``torch.optim.Adam`` and ``torch.optim.AdamW``.

    Torch's step is ``θ ← θ − η/(1−β1^t) · m / (√v/√(1−β2^t) + ε)`` with the EMA
    ``m = β1 m + (1−β1) g``, i.e. ``θ ← θ − η P⁻¹ m`` with

        ``P = (1−β1^t) · (√v / √(1−β2^t) + ε)``

    (``v = max_exp_avg_sq`` when ``amsgrad``), ``t = state["step"]`` of each parameter, and
    the EMA-momentum threshold ``(2+2β1)/((1−β1)η)``. The threshold assumes ``P`` frozen; early
    on ``(1−β1^t)`` makes ``P`` tiny, so skip the first few dozen steps.

    Before the first step (no measured parameter has state) ``P`` is not available:
    ``preconditioned=True, preconditioner=None``. A measured parameter without state once
    others have one (it never received a gradient) gets ``P = +inf``. ``None`` when β1
    differs over the active groups.
    """
    found = setup(optimizer, params, ())
    if found is None:
        return None
    eta_ref, groups, active, hyper = found
    beta1 = float(hyper["betas"][0])
    if any(float(g["betas"][0]) != beta1 for g in active) or not 0.0 <= beta1 < 1.0:
        return None
    decoupled = adam_decay_kind(optimizer, hyper) is WeightDecay.DECOUPLED
    if not agree(active, ("decoupled_weight_decay",)):
        return None
    momentum = Momentum("ema", beta=beta1)
    threshold = momentum.threshold(eta_ref)
    name = "AdamW" if decoupled else "Adam"
    rule = f"{name} EMA momentum (2+2β1)/((1−β1)η), β1={beta1:g}, η={eta_ref:g}"
    rule += wd_note(active, decoupled=decoupled)
    kind = decay_kind(active, WeightDecay.DECOUPLED if decoupled else WeightDecay.COUPLED)
    extra: dict[str, Any] = {"momentum": momentum, "weight_decay": kind}

    decay = None if decoupled else coupled_decay(params, groups)  # D does not depend on P
    states = [optimizer.state.get(p, {}) for p in params]
    if not any("step" in s for s in states):
        return Stability(threshold, True, None, rule, coupled_decay=decay, **extra)
    precond: list[torch.Tensor] = []
    for p, g, s in zip(params, groups, states):
        scale = lr_scale(g, eta_ref)
        if g is None or "step" not in s or math.isinf(scale):
            precond.append(torch.full(p.shape, math.inf, dtype=p.dtype, device=p.device))
            continue
        b1, b2 = (float(b) for b in g["betas"])
        t = float(s["step"])
        v = s["max_exp_avg_sq"] if g.get("amsgrad", False) else s["exp_avg_sq"]
        denom = v.detach().sqrt() / math.sqrt(1.0 - b2**t) + float(g["eps"])
        precond.append((denom * ((1.0 - b1**t) * scale)).to(p.dtype))
    return Stability(threshold, True, precond, rule, coupled_decay=decay, **extra)


def adam_decay_kind(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> WeightDecay:
    """``DECOUPLED`` for AdamW or ``decoupled_weight_decay=True``, else ``COUPLED`` (L2)."""
    default = isinstance(optimizer, torch.optim.AdamW)
    if bool(group.get("decoupled_weight_decay", default)):
        return WeightDecay.DECOUPLED
    return WeightDecay.COUPLED


def adam_bias_correction(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any]
) -> float:
    """``1/(1−β1^t)``: the flow's ``P`` is ``√v̂ + ε`` (``m/(1−β1^t) ≈ g``)."""
    t = float(state.get("step", 0))
    if t <= 0:
        return 1.0
    beta1 = float(group["betas"][0])
    return 1.0 / (1.0 - beta1**t)


ADAM_PROFILE = OptimizerProfile(
    name="torch.optim.Adam",
    stability=adam_stability,
    effective_scale=lambda optimizer: 1.0,  # bias-corrected EMA: m → g
    bias_correction=adam_bias_correction,
    weight_decay=adam_decay_kind,
    needs_state=True,
    bias_corrected=True,
)

register_optimizer(torch.optim.SGD, SGD_PROFILE)
register_optimizer(torch.optim.Adam, ADAM_PROFILE)
register_optimizer(torch.optim.AdamW, ADAM_PROFILE)
