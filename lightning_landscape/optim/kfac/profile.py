"""The profile of an optimizer driven by K-FAC, built from the base optimizer's profile.

A :class:`~lightning_landscape.optim.kfac.KFACPreconditioner` built with ``optimizer=`` attaches
a :class:`KFACProfile` (:func:`kfac_profile` of the base optimizer's class profile) to that
optimizer instance (:func:`~lightning_landscape.optim.profile.attach_profile`, released with
the preconditioner), so ``Sharpness`` reports the preconditioned sharpness of what actually
runs. The profile's ``P`` is an operator (``inverse_sqrt``; ``operator=True``: no
gradient-flow deviation); ``κ`` and the bias correction are the base's; the base's L2 decay
becomes ``WeightDecay.PRECONDITIONED``.

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
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..profile import (
    OptimizerProfile,
    Stability,
    WeightDecay,
    attach_profile,
    attached_profile,
    detach_profile,
    profile_for_class,
)

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["KFACProfile", "attach", "attached_kfac", "detach", "kfac_profile", "kfac_stability"]


@dataclass(frozen=True)
class KFACProfile(OptimizerProfile):
    """An :class:`OptimizerProfile` for ``base`` preconditioned by one live K-FAC instance.

    Attributes:
        base: The base optimizer's profile (``None``: unknown optimizer, no threshold).
        ref: Weak reference to the :class:`KFACPreconditioner`.
    """

    base: OptimizerProfile | None = None
    ref: weakref.ReferenceType[Any] | None = None

    @property
    def preconditioner(self) -> KFACPreconditioner | None:
        """The live preconditioner (``None`` once it is gone)."""
        return None if self.ref is None else self.ref()


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
    kind = base.weight_decay
    if kind is WeightDecay.COUPLED:
        rule += "; K-FAC: L2 weight decay is added after preconditioning (λ_max + wd/ν)"
        kind = WeightDecay.PRECONDITIONED
    decay = _post_decay(pre, params, base, scales, nu)
    if decay is False:
        return None
    if not pre.ready:
        return Stability(threshold, True, None, rule, momentum=base.momentum, weight_decay=kind)
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
        momentum=base.momentum,
        weight_decay=kind,
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


def _stability(
    ref: weakref.ReferenceType[KFACPreconditioner],
    base: OptimizerProfile | None,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
) -> Stability | None:
    stab = None if base is None else base.stability(optimizer, list(params))
    pre = ref()
    if pre is None:  # the preconditioner is gone: the base rule applies again
        return stab
    return kfac_stability(pre, optimizer, list(params), stab)


def _decay_kind(
    base: OptimizerProfile | None, optimizer: torch.optim.Optimizer, group: dict[str, Any]
) -> WeightDecay:
    kind = WeightDecay.COUPLED if base is None else base.decay_kind(optimizer, group)
    return WeightDecay.PRECONDITIONED if kind is WeightDecay.COUPLED else kind


def kfac_profile(pre: KFACPreconditioner, base: OptimizerProfile | None) -> KFACProfile:
    """The profile of the optimizer ``base`` describes, preconditioned by ``pre``."""
    ref = weakref.ref(pre)
    return KFACProfile(
        name=f"K-FAC on {'an unknown optimizer' if base is None else base.name}",
        stability=partial(_stability, ref, base),
        effective_scale=None if base is None else base.effective_scale,
        bias_correction=None if base is None else base.bias_correction,
        weight_decay=partial(_decay_kind, base),
        needs_state=True,
        bias_corrected=False if base is None else base.bias_corrected,
        operator=True,
        base=base,
        ref=ref,
    )


def attached_kfac(optimizer: torch.optim.Optimizer) -> KFACPreconditioner | None:
    """The live K-FAC preconditioner attached to ``optimizer`` (``None`` if there is none)."""
    profile = attached_profile(optimizer)
    return profile.preconditioner if isinstance(profile, KFACProfile) else None


def _release(optimizer_ref: weakref.ReferenceType[Any], profile: KFACProfile) -> None:
    optimizer = optimizer_ref()
    if optimizer is not None:
        detach_profile(optimizer, profile)


def attach(pre: KFACPreconditioner, optimizer: torch.optim.Optimizer) -> None:
    """Attach ``pre``'s :class:`KFACProfile` to ``optimizer``, until ``pre`` is gone."""
    profile = kfac_profile(pre, profile_for_class(type(optimizer)))
    attach_profile(optimizer, profile)
    weakref.finalize(pre, _release, weakref.ref(optimizer), profile).atexit = False


def detach(pre: KFACPreconditioner, optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`attach` (no-op if another profile was attached since)."""
    profile = attached_profile(optimizer)
    if isinstance(profile, KFACProfile) and profile.preconditioner is pre:
        detach_profile(optimizer, profile)
