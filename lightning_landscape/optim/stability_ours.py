"""Stability rules of the package's optimizers (NovoGrad, RSG, ARSG) for the registry.

Each optimizer is written as ``θ ← θ − η_ref · P⁻¹ u`` with a frozen diagonal ``P`` and a search
direction ``u``, following the conventions of :mod:`lightning_landscape.optim.stability` (lr of
other groups folded into ``P``, ``+inf`` for unmanaged or frozen parameters, ``None`` when the
momentum-type hyperparameters differ over the active groups, for ``maximize`` and complex
parameters). Importing :mod:`lightning_landscape.optim` registers them.

Weight decay is *coupled* in all three (:attr:`Stability.coupled_decay` gives ``D``; the
threshold applies to ``λ_max(P^-1/2 (H + D) P^-1/2)``): RSG and ARSG add ``wd·θ`` to the
gradient before the EMAs, ``D = wd``; NovoGrad adds ``d·θ`` to the *normalised* gradient, see
below: ``D = d·P_t``, ``P_t = √v + ε`` of the tensor (the lr ratio not folded in), i.e. a shift
``d·η_g/η_ref`` after preconditioning. ``maximize`` (all three) gives ``None``: it minimises
``−L``, whose dynamics are governed by ``P^-1/2 (−H + D) P^-1/2``, while the measured sharpness
is ``λ_max`` of the loss's ``H``: the edge is then set by the most negative curvature of ``H``,
which no threshold on ``λ_max(H)`` can express.

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
    >>> from lightning_landscape.optim import RSG, stability_of
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> s = stability_of(RSG([w], lr=0.1, beta=0.9, observation=0.1), [w])
    >>> round(s.threshold, 9), s.preconditioned
    (135.714285714, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .novograd import NovoGrad
from .rsg import ARSG, RSG
from .stability import (
    Stability,
    _active,
    _agree,
    _common_checks,
    _coupled_decay,
    _locate,
    _lr_scale,
    _wd_note,
    register_stability,
)

__all__ = ["arsg_stability", "novograd_stability", "rsg_stability"]


def _rsg_threshold(beta: float, mu: float, eta: float) -> float:
    return 2.0 * (1.0 + beta) / (eta * (1.0 - beta + 2.0 * beta * mu))


def _setup(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], keys: Sequence[str]
) -> tuple[float, list[dict[str, Any] | None], list[dict[str, Any]], dict[str, Any]] | None:
    """``(η_ref, owning groups, active groups, hyper group)``, or ``None`` (no single threshold)."""
    if not _common_checks(optimizer, params):
        return None
    eta_ref = float(optimizer.param_groups[0]["lr"])
    if eta_ref <= 0.0:
        return None
    groups = _locate(optimizer, params)
    active = _active(groups)
    if not _agree(active, keys):
        return None
    return eta_ref, groups, active, active[0] if active else optimizer.param_groups[0]


def _full(p: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """``value`` (a number or a tensor broadcastable to ``p``) as a tensor shaped like ``p``."""
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if isinstance(value, torch.Tensor):
        return out.copy_(value)
    return out.fill_(value)


def rsg_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.RSG`: ``2(1+β)/(η(1−β+2βμ))``, ``P = I``.

    ``None`` when ``beta`` or ``observation`` differ over the active groups.
    """
    setup = _setup(optimizer, params, ("beta", "observation"))
    if setup is None:
        return None
    eta_ref, groups, active, hyper = setup
    beta, mu = float(hyper["beta"]), float(hyper["observation"])
    threshold = _rsg_threshold(beta, mu, eta_ref)
    rule = f"RSG 2(1+β)/(η(1−β+2βμ)), β={beta:g}, μ={mu:g}, η={eta_ref:g}"
    rule += _wd_note(active, decoupled=False)
    scales = [_lr_scale(g, eta_ref) for g in groups]
    decay = _coupled_decay(params, groups)
    if all(s == 1.0 for s in scales):
        return Stability(threshold, False, None, rule, coupled_decay=decay)
    precond = [_full(p, s) for p, s in zip(params, scales)]
    return Stability(threshold, True, precond, rule + "; per-group lr in P", coupled_decay=decay)


def arsg_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.ARSG` (both modes, see the module doc).

    ``None`` when ``β1``, ``observation`` or ``amsgrad`` differ over the active groups
    (``β2`` and ``eps`` only shape ``P`` and may differ).
    """
    setup = _setup(optimizer, params, ("observation", "amsgrad"))
    if setup is None:
        return None
    eta_ref, groups, active, hyper = setup
    beta1, mu = float(hyper["betas"][0]), float(hyper["observation"])
    if any(float(g["betas"][0]) != beta1 for g in active):
        return None
    amsgrad = bool(hyper["amsgrad"])
    states = [optimizer.state.get(p, {}) for p in params]
    steps = [int(s["step"]) for s in states if s.get("step", 0) > 0]

    def k_of(t: int) -> float:  # u_Adam = k·u_RSG(μ_t); k = 1 in AMSGrad mode
        return 1.0 if amsgrad else (1.0 - mu) / (1.0 - beta1**t) + mu

    mu_t = mu / k_of(max(steps)) if steps else mu
    threshold = _rsg_threshold(beta1, mu_t, eta_ref)
    mode = "AMSGrad mode, P=√v̂" if amsgrad else "Adam mode, P=(√v̂+ε)/k"
    rule = f"ARSG ({mode}) 2(1+β1)/(η(1−β1+2β1μ)), β1={beta1:g}, μ={mu_t:g}, η={eta_ref:g}"
    rule += _wd_note(active, decoupled=False)
    decay = _coupled_decay(params, groups)
    if not steps:
        return Stability(threshold, True, None, rule, coupled_decay=decay)
    precond: list[torch.Tensor] = []
    for p, g, s in zip(params, groups, states):
        scale = _lr_scale(g, eta_ref)
        if g is None or s.get("step", 0) == 0 or math.isinf(scale):
            precond.append(_full(p, math.inf))
        elif amsgrad:
            precond.append(_full(p, s["max_exp_avg_sq"].detach().sqrt() * scale))
        else:
            t = int(s["step"])
            beta2 = float(g["betas"][1])
            denom = s["exp_avg_sq"].detach().sqrt() / math.sqrt(1.0 - beta2**t) + float(g["eps"])
            precond.append(_full(p, denom * (scale / k_of(t))))
    return Stability(threshold, True, precond, rule, coupled_decay=decay)


def novograd_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Stability of :class:`~lightning_landscape.optim.NovoGrad`: ``(2+2β1)/(sη)``, ``P = √v + ε``.

    ``s = 1 − β1`` with ``grad_averaging``, else 1; ``P`` is one value per tensor (``√v̂ + ε``
    with amsgrad). Weight decay ``d`` enters as ``H + d·P`` (``coupled_decay = d·P``, before the
    lr ratio is folded into ``P``; ``None`` before the first step, like ``P``). ``None`` when
    ``β1`` or ``grad_averaging`` differ over the active groups.
    """
    setup = _setup(optimizer, params, ("grad_averaging",))
    if setup is None:
        return None
    eta_ref, groups, active, hyper = setup
    beta1 = float(hyper["betas"][0])
    if any(float(g["betas"][0]) != beta1 for g in active):
        return None
    averaging = bool(hyper["grad_averaging"])
    s_factor = (1.0 - beta1) if averaging else 1.0
    threshold = (2.0 + 2.0 * beta1) / (s_factor * eta_ref)
    if averaging:
        rule = f"NovoGrad EMA momentum (2+2β1)/((1−β1)η), β1={beta1:g}, η={eta_ref:g}"
    else:
        rule = f"NovoGrad heavy ball (2+2β1)/η, β1={beta1:g}, η={eta_ref:g}"
    rule += "; P=√v+ε per tensor"
    wds = sorted({float(g["weight_decay"]) for g in active} - {0.0})
    if wds:
        vals = ",".join(f"{w:g}" for w in wds)
        rule += f"; weight_decay={vals}: threshold applies to H + wd·P"
    states = [optimizer.state.get(p, {}) for p in params]
    if not any(st.get("step", 0) > 0 for st in states):
        return Stability(threshold, True, None, rule)
    precond: list[torch.Tensor] = []
    raw: list[torch.Tensor | float] = []  # P without the lr ratio: D = d·raw
    for p, g, st in zip(params, groups, states):
        scale = _lr_scale(g, eta_ref)
        if g is None or st.get("step", 0) == 0 or math.isinf(scale):
            precond.append(_full(p, math.inf))
            raw.append(0.0)
            continue
        v = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
        raw.append(v.detach().sqrt() + float(g["eps"]))
        precond.append(_full(p, raw[-1] * scale))
    decay = _coupled_decay(params, groups, raw)
    return Stability(threshold, True, precond, rule, coupled_decay=decay)


register_stability(NovoGrad, novograd_stability)
register_stability(RSG, rsg_stability)
register_stability(ARSG, arsg_stability)
