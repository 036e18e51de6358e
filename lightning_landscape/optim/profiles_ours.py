"""Profiles of the package's optimizers (NovoGrad, RSG, ARSG): thresholds, ``P``, ``κ``, decay.

Each optimizer is written as ``θ ← θ − η_ref · P⁻¹ u`` with a frozen diagonal ``P`` and a search
direction ``u``, following the conventions of :mod:`lightning_landscape.optim.stability` (lr of
other groups folded into ``P``, ``+inf`` for unmanaged or frozen parameters, ``None`` when the
momentum-type hyperparameters differ over the active groups, for ``maximize`` and complex
parameters). Importing :mod:`lightning_landscape.optim` registers them
(:func:`~lightning_landscape.optim.profile.register_optimizer`).

Weight decay enters the threshold through :attr:`Stability.coupled_decay` ``D`` in all three (the
threshold applies to ``λ_max(P^-1/2 (H + D) P^-1/2)``): RSG and ARSG add ``wd·θ`` to the
gradient before the EMAs (``WeightDecay.COUPLED``), ``D = wd``; NovoGrad adds ``d·θ`` to the
*normalised* gradient (``WeightDecay.PRECONDITIONED``), see below: ``D = d·P_t``,
``P_t = √v + ε`` of the tensor (the lr ratio not folded in), i.e. a shift ``d·η_g/η_ref``
after preconditioning. ``maximize`` (all three) gives ``None``: it minimises
``−L``, whose dynamics are governed by ``P^-1/2 (−H + D) P^-1/2``, while the measured sharpness
is ``λ_max`` of the loss's ``H``: the edge is then set by the most negative curvature of ``H``,
which no threshold on ``λ_max(H)`` can express.

Effective step of the flow ``κ``: 1 for RSG and ARSG (their EMAs converge to ``g``; ARSG's
Adam-mode ``P`` carries ``1/k_t``, undone by its bias correction ``k_t``), ``s/(1−β1)`` for
NovoGrad.

Derivations (quadratic ``L = ½ θᵀHθ``, ``P`` frozen, ``λ`` an eigenvalue of ``P^-1/2 H P^-1/2``,
``z = ηλ``):

- RSG / ARSG, ``m ← βm + (1−β)g``, ``u = (1−μ)m + μg``: the 2×2 iteration on ``(m, θ)`` has an
  eigenvalue ``−1`` at ``z(1 − β + 2βμ)/(1 + β) = 2``, its determinant ``β(1 − zμ)`` stays
  inside ``(−1, 1)`` up to there, so the threshold is ``2(1+β)/(η(1−β+2βμ))`` (``μ = 0``: the
  EMA row ``(2+2β)/((1−β)η)``; ``μ = 1−β``: Nesterov; ``μ = 1``: ``2/η``).
- ARSG AMSGrad mode: ``P = √v̂``, the RSG threshold with ``β = β1``.
- ARSG Adam mode: ``(1−μ)m/c1 + μg = k·((1−μ_t)m + μ_t g)`` with ``c1 = 1 − β1^t``,
  ``k = (1−μ)/c1 + μ`` and ``μ_t = μ/k``; hence ``P = (√v/√(1−β2^t) + ε)/k`` and the RSG
  threshold with ``μ_t`` (``μ = 0`` gives back Adam's ``P = c1·(...)`` and EMA threshold).
  ``t`` is the largest step count of the measured parameters (``μ_t → μ`` as ``β1^t → 0``);
  before the first step ``μ_t = μ``.
- NovoGrad, ``m ← β1 m + s(g/P + dθ)``, ``θ ← θ − ηm`` with the per-tensor ``P = √v + ε``
  (``√v̂ + ε`` with amsgrad) and ``s = 1−β1`` with ``grad_averaging`` else 1: since
  ``g/P + dθ = P⁻¹(H + dP)θ``, ``b = m/s`` is the heavy ball ``b ← β1 b + P⁻¹(H + dP)θ`` with
  step ``sη``, threshold ``(2+2β1)/(sη)`` on ``λ_max(P^-1/2 (H + d·P) P^-1/2) =
  λ_max(P^-1/2 H P^-1/2) + d`` for one group (``d·η_g/η_ref`` per group with lr ratios).

Example::

    >>> import torch
    >>> from lightning_landscape.optim import RSG, profile_for
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = RSG([w], lr=0.1, beta=0.9, observation=0.1)
    >>> s = profile_for(opt).stability(opt, [w])
    >>> round(s.threshold, 9), s.preconditioned, s.momentum.form
    (135.714285714, False, 'rsg')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .novograd import NovoGrad
from .profile import Momentum, OptimizerProfile, Stability, WeightDecay, register_optimizer
from .profile_tools import coupled_decay, decay_kind, full, lr_scale, setup, wd_note
from .rsg import ARSG, RSG

__all__ = [
    "ARSG_PROFILE",
    "NOVOGRAD_PROFILE",
    "RSG_PROFILE",
    "arsg_bias_correction",
    "arsg_stability",
    "novograd_effective_scale",
    "novograd_stability",
    "rsg_stability",
]


def rsg_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.RSG`: ``2(1+β)/(η(1−β+2βμ))``, ``P = I``.

    ``None`` when ``beta`` or ``observation`` differ over the active groups.
    """
    found = setup(optimizer, params, ("beta", "observation"))
    if found is None:
        return None
    eta_ref, groups, active, hyper = found
    beta, mu = float(hyper["beta"]), float(hyper["observation"])
    momentum = Momentum("rsg", beta=beta, observation=mu)
    threshold = momentum.threshold(eta_ref)
    rule = f"RSG 2(1+β)/(η(1−β+2βμ)), β={beta:g}, μ={mu:g}, η={eta_ref:g}"
    rule += wd_note(active, decoupled=False)
    extra: dict[str, Any] = {
        "momentum": momentum,
        "weight_decay": decay_kind(active, WeightDecay.COUPLED),
    }
    scales = [lr_scale(g, eta_ref) for g in groups]
    decay = coupled_decay(params, groups)
    if all(s == 1.0 for s in scales):
        return Stability(threshold, False, None, rule, coupled_decay=decay, **extra)
    precond = [full(p, s) for p, s in zip(params, scales)]
    return Stability(
        threshold, True, precond, rule + "; per-group lr in P", coupled_decay=decay, **extra
    )


def _arsg_k(amsgrad: bool, beta1: float, mu: float, t: int | float) -> float:
    """``u_Adam = k·u_RSG(μ_t)``; ``k = 1`` in AMSGrad mode."""
    return 1.0 if amsgrad else (1.0 - mu) / (1.0 - beta1**t) + mu


def arsg_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.ARSG` (both modes, see the module doc).

    ``None`` when ``β1``, ``observation`` or ``amsgrad`` differ over the active groups
    (``β2`` and ``eps`` only shape ``P`` and may differ).
    """
    found = setup(optimizer, params, ("observation", "amsgrad"))
    if found is None:
        return None
    eta_ref, groups, active, hyper = found
    beta1, mu = float(hyper["betas"][0]), float(hyper["observation"])
    if any(float(g["betas"][0]) != beta1 for g in active):
        return None
    amsgrad = bool(hyper["amsgrad"])
    states = [optimizer.state.get(p, {}) for p in params]
    steps = [int(s["step"]) for s in states if s.get("step", 0) > 0]
    mu_t = mu / _arsg_k(amsgrad, beta1, mu, max(steps)) if steps else mu
    momentum = Momentum("rsg", beta=beta1, observation=mu_t)
    threshold = momentum.threshold(eta_ref)
    mode = "AMSGrad mode, P=√v̂" if amsgrad else "Adam mode, P=(√v̂+ε)/k"
    rule = f"ARSG ({mode}) 2(1+β1)/(η(1−β1+2β1μ)), β1={beta1:g}, μ={mu_t:g}, η={eta_ref:g}"
    rule += wd_note(active, decoupled=False)
    extra: dict[str, Any] = {
        "momentum": momentum,
        "weight_decay": decay_kind(active, WeightDecay.COUPLED),
    }
    decay = coupled_decay(params, groups)
    if not steps:
        return Stability(threshold, True, None, rule, coupled_decay=decay, **extra)
    precond: list[torch.Tensor] = []
    for p, g, s in zip(params, groups, states):
        scale = lr_scale(g, eta_ref)
        if g is None or s.get("step", 0) == 0 or math.isinf(scale):
            precond.append(full(p, math.inf))
        elif amsgrad:
            precond.append(full(p, s["max_exp_avg_sq"].detach().sqrt() * scale))
        else:
            t = int(s["step"])
            beta2 = float(g["betas"][1])
            denom = s["exp_avg_sq"].detach().sqrt() / math.sqrt(1.0 - beta2**t) + float(g["eps"])
            precond.append(full(p, denom * (scale / _arsg_k(amsgrad, beta1, mu, t))))
    return Stability(threshold, True, precond, rule, coupled_decay=decay, **extra)


def arsg_bias_correction(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any]
) -> float:
    """``k_t = (1−μ)/(1−β1^t) + μ`` in Adam mode (its ``P`` carries ``1/k_t``), else 1."""
    t = float(state.get("step", 0))
    if t <= 0:
        return 1.0
    beta1 = float(group["betas"][0]) if "betas" in group else 0.0
    if not group["amsgrad"]:
        mu = float(group["observation"])
        return (1.0 - mu) / (1.0 - beta1**t) + mu
    return 1.0


def novograd_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.NovoGrad`: ``(2+2β1)/(sη)``, ``P = √v + ε``.

    ``s = 1 − β1`` with ``grad_averaging``, else 1; ``P`` is one value per tensor (``√v̂ + ε``
    with amsgrad). Weight decay ``d`` enters as ``H + d·P`` (``coupled_decay = d·P``, before the
    lr ratio is folded into ``P``; ``None`` before the first step, like ``P``). ``None`` when
    ``β1`` or ``grad_averaging`` differ over the active groups.
    """
    found = setup(optimizer, params, ("grad_averaging",))
    if found is None:
        return None
    eta_ref, groups, active, hyper = found
    beta1 = float(hyper["betas"][0])
    if any(float(g["betas"][0]) != beta1 for g in active):
        return None
    averaging = bool(hyper["grad_averaging"])
    # EMA (s = 1 − β1): (2+2β1)/((1−β1)η); heavy ball (s = 1): (2+2β1)/η
    momentum = Momentum("ema" if averaging else "heavy_ball", beta=beta1)
    threshold = momentum.threshold(eta_ref)
    if averaging:
        rule = f"NovoGrad EMA momentum (2+2β1)/((1−β1)η), β1={beta1:g}, η={eta_ref:g}"
    else:
        rule = f"NovoGrad heavy ball (2+2β1)/η, β1={beta1:g}, η={eta_ref:g}"
    rule += "; P=√v+ε per tensor"
    wds = sorted({float(g["weight_decay"]) for g in active} - {0.0})
    if wds:
        vals = ",".join(f"{w:g}" for w in wds)
        rule += f"; weight_decay={vals}: threshold applies to H + wd·P"
    extra: dict[str, Any] = {
        "momentum": momentum,
        "weight_decay": decay_kind(active, WeightDecay.PRECONDITIONED),
    }
    states = [optimizer.state.get(p, {}) for p in params]
    if not any(st.get("step", 0) > 0 for st in states):
        return Stability(threshold, True, None, rule, **extra)
    precond: list[torch.Tensor] = []
    raw: list[torch.Tensor | float] = []  # P without the lr ratio: D = d·raw
    for p, g, st in zip(params, groups, states):
        scale = lr_scale(g, eta_ref)
        if g is None or st.get("step", 0) == 0 or math.isinf(scale):
            precond.append(full(p, math.inf))
            raw.append(0.0)
            continue
        v = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
        raw.append(v.detach().sqrt() + float(g["eps"]))
        precond.append(full(p, raw[-1] * scale))
    decay = coupled_decay(params, groups, raw)
    return Stability(threshold, True, precond, rule, coupled_decay=decay, **extra)


def novograd_effective_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """``κ = s/(1−β1)``: ``m ← β1 m + s(g/P + dθ)`` converges to ``s(g/P + dθ)/(1−β1)``.

    ``None`` when the groups disagree on ``β1`` or ``grad_averaging``.
    """
    betas = {(float(g["betas"][0]), bool(g["grad_averaging"])) for g in optimizer.param_groups}
    beta1, averaging = betas.pop()
    return None if betas else (1.0 if averaging else 1.0 / (1.0 - beta1))


RSG_PROFILE = OptimizerProfile(
    name="lightning_landscape.optim.RSG",
    stability=rsg_stability,
    effective_scale=lambda optimizer: 1.0,
    weight_decay=WeightDecay.COUPLED,
)
ARSG_PROFILE = OptimizerProfile(
    name="lightning_landscape.optim.ARSG",
    stability=arsg_stability,
    effective_scale=lambda optimizer: 1.0,
    bias_correction=arsg_bias_correction,
    weight_decay=WeightDecay.COUPLED,
    needs_state=True,
    bias_corrected=True,
)
NOVOGRAD_PROFILE = OptimizerProfile(
    name="lightning_landscape.optim.NovoGrad",
    stability=novograd_stability,
    effective_scale=novograd_effective_scale,
    weight_decay=WeightDecay.PRECONDITIONED,
    needs_state=True,
)

register_optimizer(NovoGrad, NOVOGRAD_PROFILE)
register_optimizer(RSG, RSG_PROFILE)
register_optimizer(ARSG, ARSG_PROFILE)
