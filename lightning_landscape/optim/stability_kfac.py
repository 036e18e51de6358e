"""Stability of an optimizer driven by K-FAC: the base rule on the K-FAC-preconditioned Hessian.

A :class:`~lightning_landscape.optim.kfac.KFACPreconditioner` built with ``optimizer=`` attaches
this rule to that optimizer instance (:func:`~lightning_landscape.optim.stability.attach_stability`),
so :func:`~lightning_landscape.optim.stability.stability_of` — and hence ``Sharpness`` — reports
the preconditioned sharpness of what actually runs.

The base optimizer turns the gradient K-FAC hands it into its update: ``ν · P_l⁻¹ g`` on each
registered layer ``l`` (``P_l`` the damped Kronecker factor *as used in the last step*:
``G ⊗ A + λI`` in the last eigenbasis with the last damping for ``damping_mode="exact"``,
``(G + √λ/π I) ⊗ (A + π√λ I)`` for ``"pi"``; a bias-free layer has no bias row; ``ν`` the last
step's KL-clipping scale) and the raw ``g`` on every other parameter — among them those of
layers K-FAC skipped (tied weights, frozen or never-called layers). That is ``ν · P⁻¹ g`` with
``P = ν I`` off the layers (the raw gradient is not scaled by ``ν``; ``P = I`` there without
KL clipping). With ``P`` and ``ν`` frozen, the base update direction is that of the base
optimizer with step ``ν·η`` in the ``P``-preconditioned space, so the iteration is stable while

    ``λ_max(P^-1/2 H P^-1/2) < threshold_base / ν``

(``threshold_base`` the base optimizer's own threshold for ``η = param_groups[0]["lr"]``).

Rules:

- the base optimizer must have a known rule (``None`` otherwise);
- it must not itself be diagonally preconditioned (Adam, NovoGrad, ARSG after their first step
  give ``None``: ``P_base⁻¹ P⁻¹`` is not symmetric, no single threshold exists). A base ``P``
  that is constant on each parameter tensor (per-group learning rates, frozen parameters) is
  folded in, provided a layer's weight and bias share it;
- before the preconditioner's first step ``P`` is not available (``preconditioned=True``,
  ``inverse_sqrt=None``);
- an L2 weight decay ``wd`` of the base optimizer is added *after* preconditioning, so its
  update is ``−νη(P⁻¹ g) − η·wd·θ``; the threshold then applies to
  ``λ_max(P^-1/2 H P^-1/2 + D/(ν s))`` (``D`` the base's per-parameter decay, ``s`` its
  per-tensor lr scale; ``wd/ν`` added to λ_max for one decay everywhere). That symmetric form
  needs ``D/s`` constant on each K-FAC layer (it then commutes with the layer's block); a layer
  whose weight and bias decay differently has no single threshold (``None``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from . import stability as _stability
from .stability import Stability, attach_stability, detach_stability

if TYPE_CHECKING:
    from .kfac import KFACPreconditioner

__all__ = ["attach", "attached_kfac", "detach", "kfac_stability"]

# the rule each optimizer got from `attach`, to recognise it in `detach`
_OURS: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


def _tensor_scales(base: Stability, params: Sequence[torch.Tensor]) -> list[float] | None:
    """One ``P_base`` value per parameter tensor, or ``None`` if ``P_base`` varies inside one."""
    if base.preconditioner is None:
        return [1.0] * len(params)
    scales = []
    for diag in base.preconditioner:
        flat = diag.reshape(-1)
        if flat.numel() == 0:
            scales.append(1.0)
            continue
        first = flat[0]
        if not bool((flat == first).all()):
            return None
        scales.append(float(first))
    return scales


def kfac_stability(
    pre: KFACPreconditioner,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    base: Stability | None,
) -> Stability | None:
    """The stability of ``optimizer`` preconditioned by ``pre`` (see the module docstring)."""
    if base is None:
        return None
    if base.inverse_sqrt is not None or (base.preconditioned and base.preconditioner is None):
        return None
    scales = _tensor_scales(base, params)
    if scales is None:
        return None
    index = {id(p): i for i, p in enumerate(params)}
    for layer in pre.layers.values():
        shared = {scales[index[id(p)]] for p in layer.params if id(p) in index}
        if len(shared) > 1:
            return None
    nu = pre.kl_scale if pre.ready else 1.0
    threshold = base.threshold / nu
    rule = (
        f"K-FAC ({pre.damping_mode} damping, P = damped G⊗A per layer, ν·I elsewhere) "
        f"on {base.rule}"
    )
    if nu != 1.0:
        rule += f"; KL scale ν={nu:.4g}: threshold/ν"
    if "weight_decay" in base.rule and "decoupled" not in base.rule:
        rule += "; K-FAC: L2 weight decay is added after preconditioning (λ_max + wd/ν)"
    decay = _post_decay(pre, params, base, scales, nu)
    if decay is False:
        return None
    if not pre.ready:
        return Stability(threshold, True, None, rule)
    params_list = list(params)

    def inverse_sqrt(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = pre.inverse_sqrt(params_list, vectors)
        done = {id(p) for layer in pre.layers.values() if layer.ready for p in layer.params}
        # a gradient K-FAC left alone was not scaled by ν: P = ν there (see the docstring)
        eff = [s if id(p) in done else s * nu for p, s in zip(params_list, scales)]
        return [
            v if s == 1.0 else (torch.zeros_like(v) if math.isinf(s) else v / math.sqrt(s))
            for v, s in zip(out, eff)
        ]

    return Stability(
        threshold,
        True,
        None,
        rule,
        inverse_sqrt,
        coupled_decay=decay if isinstance(decay, list) else None,
        decay_after_preconditioning=isinstance(decay, list),
    )


def _post_decay(
    pre: KFACPreconditioner,
    params: Sequence[torch.Tensor],
    base: Stability,
    scales: list[float],
    nu: float,
) -> list[torch.Tensor] | None | bool:
    """``D/(ν s)`` per parameter (added after preconditioning), ``None`` without decay, or
    ``False`` when a K-FAC layer's parameters decay differently (no symmetric form)."""
    if base.coupled_decay is None:
        return None
    per_tensor: list[float] = []
    for d in base.coupled_decay:
        flat = d.reshape(-1)
        first = float(flat[0]) if flat.numel() else 0.0
        if flat.numel() and not bool((flat == first).all()):
            return False
        per_tensor.append(first)
    post = [0.0 if math.isinf(s) else d / (nu * s) for d, s in zip(per_tensor, scales)]
    index = {id(p): i for i, p in enumerate(params)}
    for layer in pre.layers.values():
        values = {post[index[id(p)]] for p in layer.params if id(p) in index}
        if len(values) > 1:
            return False
    if not any(post):
        return None
    return [torch.full_like(p, v) for p, v in zip(params, post)]


def _rule(
    ref: weakref.ReferenceType[KFACPreconditioner],
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    base: Stability | None,
) -> Stability | None:
    pre = ref()
    if pre is None:  # the preconditioner is gone: the base rule applies again
        return base
    return kfac_stability(pre, optimizer, params, base)


def attached_kfac(optimizer: torch.optim.Optimizer) -> KFACPreconditioner | None:
    """The live K-FAC preconditioner attached to ``optimizer`` (``None`` if there is none)."""
    _, ref = _OURS.get(optimizer, (None, None))
    return None if ref is None else ref()


def attach(pre: KFACPreconditioner, optimizer: torch.optim.Optimizer) -> None:
    """Make :func:`stability_of` report ``optimizer`` as preconditioned by ``pre``."""
    ref = weakref.ref(pre)
    rule = partial(_rule, ref)
    _OURS[optimizer] = (rule, ref)
    attach_stability(optimizer, rule)


def detach(pre: KFACPreconditioner, optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`attach` (no-op if another rule was attached since)."""
    rule, ref = _OURS.get(optimizer, (None, None))
    if rule is not None and _stability._ATTACHED.get(optimizer) is rule and ref() is pre:
        detach_stability(optimizer)
