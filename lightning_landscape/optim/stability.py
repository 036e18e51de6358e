"""Stability thresholds of optimizers: the conventions, and :func:`stability_of`.

The facts about each optimizer live in its profile (:mod:`lightning_landscape.optim.profile`,
registered with :func:`~lightning_landscape.optim.profile.register_optimizer`); this module
states the conventions every profile's ``stability`` follows and keeps the earlier entry points
(:func:`register_stability`, :func:`attach_stability`) as thin wrappers building profiles.

Every supported optimizer is written as the update ``θ ← θ − η_ref · P⁻¹ u`` with
``η_ref = param_groups[0]["lr"]``, a diagonal preconditioner ``P`` read from the optimizer's
state and a search direction ``u`` built from the gradients (plain, heavy ball, Nesterov or an
EMA). On the quadratic model with ``P`` frozen the iteration is stable iff
``λ_max(P^-1/2 (H + D) P^-1/2) < threshold`` (docs/theory/sharpness.md §Thresholds; ``D`` the coupled weight decay,
below); :func:`stability_of` returns that threshold, ``P`` and ``D`` (aligned with the caller's
parameter list) and a readable rule.

Conventions shared by every entry:

- Parameter groups whose lr ``η_g`` differs from ``η_ref`` have ``η_ref / η_g`` folded into
  their ``P`` (so plain SGD with two learning rates is "preconditioned"); a group with
  ``η_g = 0``, and any parameter the optimizer does not manage, gets ``P = +inf``
  (``P^-1/2 = 0``: it never moves).
- The momentum-type hyperparameters that enter the threshold (SGD ``momentum``, ``dampening``,
  ``nesterov``; Adam ``β1``) must agree over the *active* groups (those holding a measured
  parameter with ``η_g > 0``); otherwise no single threshold exists and ``None`` is returned.
  Hyperparameters that only shape ``P`` (Adam ``β2``, ``eps``, ``amsgrad``) may differ.
- ``None`` is also returned for ``maximize=True`` (the stable region is then about ``−H``),
  complex parameters, ``η_ref <= 0`` and hyperparameters outside the analysed range.
- ``preconditioned=False`` with ``preconditioner=None`` means ``P = I``;
  ``preconditioned=True`` with ``preconditioner=None`` means "``P`` not available yet" (Adam
  before its first step), unless ``inverse_sqrt`` is set: a non-diagonal ``P`` (K-FAC) is
  given as the map applying ``P^-1/2`` to a per-parameter list of tensors.

Besides the profiles per optimizer *class*, a profile can be attached to one optimizer
*instance* (:func:`~lightning_landscape.optim.profile.attach_profile`). A K-FAC preconditioner
attaches one built from its optimizer's profile (:mod:`lightning_landscape.optim.kfac.profile`).

Weight decay. A *coupled* (L2) decay is added to the gradient first (``torch.optim.SGD`` in
every form, ``Adam`` with ``decoupled_weight_decay=False``, RSG, ARSG), so the iteration follows
``(H + D)θ``, ``D`` the diagonal of each parameter's group ``weight_decay`` (0 where it never
moves): the threshold applies to ``λ_max(P^-1/2 (H + D) P^-1/2) = λ_max(P^-1/2 H P^-1/2 + D P^-1)``
and :attr:`Stability.coupled_decay` gives ``D`` (``H`` stays the bare loss's;
:attr:`Stability.weight_decay` names the kind). *Decoupled* decay
(``AdamW``, ``decoupled_weight_decay=True``) multiplies ``θ`` by ``c = 1 − η_g·wd`` outside the
gradient: no part of the gradient's Jacobian, it stays out of ``D``. With ``P`` frozen it moves
the −1 crossing of the EMA iteration to ``threshold·(1 + c)/2 = threshold·(1 − η_g·wd/2)``: a
*lower* edge by the relative ``η_g·wd/2`` (5e-5 for ``η = 1e-3, wd = 0.1``), negligible next to
coupled decay's ``D P^-1``, which ``P ≪ 1`` magnifies. The rule string names both cases.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    >>> sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> s = stability_of(sgd, [w])
    >>> round(s.threshold, 9), s.preconditioned, s.preconditioner, s.rule
    (38.0, False, None, 'heavy ball (2+2β)/η, β=0.9, η=0.1')
    >>> adam = torch.optim.Adam([w], lr=0.01, betas=(0.9, 0.999))
    >>> s = stability_of(adam, [w])
    >>> round(s.threshold, 9), s.preconditioned, s.preconditioner
    (3800.0, True, None)
    >>> w.grad = torch.full_like(w, 2.0)
    >>> adam.step()
    >>> s = stability_of(adam, [w])
    >>> s.preconditioner[0]  # (1 - 0.9) * (|g| + eps) after one step
    tensor([0.2000, 0.2000, 0.2000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import torch

from .profile import (
    OptimizerProfile,
    Stability,
    StabilityFn,
    attach_profile,
    detach_profile,
    profile_for,
    profile_for_class,
    register_optimizer,
)
from .profiles_torch import adam_stability, sgd_stability

__all__ = [
    "Stability",
    "StabilityFn",
    "StabilityOverride",
    "adam_stability",
    "attach_stability",
    "detach_stability",
    "register_stability",
    "sgd_stability",
    "stability_of",
]

#: ``fn(optimizer, params, base)`` refining the class rule's result ``base`` for one instance.
StabilityOverride = Callable[
    [torch.optim.Optimizer, list[torch.Tensor], "Stability | None"], "Stability | None"
]


def stability_of(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Return the stability threshold and preconditioner of ``optimizer`` on ``params``.

    ``profile_for(optimizer).stability(optimizer, params)``: the instance's attached profile,
    else the class's (looked up along ``type(optimizer).__mro__``).

    Args:
        optimizer: The optimizer driving training.
        params: Ordered parameters on which the Hessian is measured; ``preconditioner[i]``
            corresponds to ``params[i]``.

    Returns:
        The :class:`Stability`, or ``None`` for an unknown optimizer or a configuration
        without a single threshold (see the module docstring).
    """
    profile = profile_for(optimizer)
    return None if profile is None else profile.stability(optimizer, list(params))


def register_stability(optimizer_cls: type[torch.optim.Optimizer], fn: StabilityFn) -> None:
    """Register (or replace) the stability rule of an optimizer class (backwards compatible).

    Prefer :func:`~lightning_landscape.optim.profile.register_optimizer`: this replaces the
    ``stability`` of the profile ``optimizer_cls`` has (its own or inherited), or registers a
    profile with only a threshold (no gradient-flow rule: ``GradientFlowDeviation`` then
    compares with the plain flow).

    Args:
        optimizer_cls: A subclass of ``torch.optim.Optimizer``; its subclasses inherit the rule
            unless they register their own.
        fn: ``fn(optimizer, params) -> Stability | None`` following the module conventions.

    Raises:
        TypeError: If ``optimizer_cls`` is not an optimizer class or ``fn`` is not callable.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    old = profile_for_class(optimizer_cls)
    if old is None:
        profile = OptimizerProfile(name=optimizer_cls.__qualname__, stability=fn)
    else:
        profile = replace(old, stability=fn)
    register_optimizer(optimizer_cls, profile)


def _refined(
    fn: StabilityOverride, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    cls_profile = profile_for_class(type(optimizer))
    params = list(params)
    base = None if cls_profile is None else cls_profile.stability(optimizer, params)
    return fn(optimizer, params, base)


def attach_stability(optimizer: torch.optim.Optimizer, fn: StabilityOverride) -> None:
    """Attach an instance rule to ``optimizer`` (backwards compatible; replaces any earlier one).

    Attaches (:func:`~lightning_landscape.optim.profile.attach_profile`) the class profile with
    its ``stability`` replaced: :func:`stability_of` then returns ``fn(optimizer, params, base)``,
    ``base`` being the class rule's result (``None`` if there is none). The optimizer is held
    weakly; ``fn`` must not hold a strong reference to it.

    Raises:
        TypeError: If ``optimizer`` is not an optimizer or ``fn`` is not callable.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    cls_profile = profile_for_class(type(optimizer))
    stability = partial(_refined, fn)
    if cls_profile is None:
        profile = OptimizerProfile(name=type(optimizer).__qualname__, stability=stability)
    else:
        profile = replace(cls_profile, stability=stability)
    attach_profile(optimizer, profile)


def detach_stability(optimizer: torch.optim.Optimizer) -> None:
    """Remove the instance profile of ``optimizer`` (no-op if none is attached)."""
    detach_profile(optimizer)
