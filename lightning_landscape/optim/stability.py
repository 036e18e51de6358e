"""Stability thresholds of optimizers: the registry that pairs an optimizer with its edge.

Every supported optimizer is written as the update ``θ ← θ − η_ref · P⁻¹ u`` with
``η_ref = param_groups[0]["lr"]``, a diagonal preconditioner ``P`` read from the optimizer's
state and a search direction ``u`` built from the gradients (plain, heavy ball, Nesterov or an
EMA). On the quadratic model with ``P`` frozen the iteration is stable iff
``λ_max(P^-1/2 (H + D) P^-1/2) < threshold`` (SCIENCE.md §A1; ``D`` the coupled weight decay,
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

Besides the rules per optimizer *class*, a rule can be attached to one optimizer *instance*
(:func:`attach_stability`): it receives the class rule's result and may refine it. A K-FAC
preconditioner attaches itself to its optimizer this way
(:mod:`lightning_landscape.optim.stability_kfac`).

Weight decay. A *coupled* (L2) decay is added to the gradient first (``torch.optim.SGD`` in
every form, ``Adam`` with ``decoupled_weight_decay=False``, RSG, ARSG), so the iteration follows
``(H + D)θ``, ``D`` the diagonal of each parameter's group ``weight_decay`` (0 where it never
moves): the threshold applies to ``λ_max(P^-1/2 (H + D) P^-1/2) = λ_max(P^-1/2 H P^-1/2 + D P^-1)``
and :attr:`Stability.coupled_decay` gives ``D`` (``H`` stays the bare loss's). *Decoupled* decay
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

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Stability",
    "StabilityFn",
    "StabilityOverride",
    "attach_stability",
    "detach_stability",
    "register_stability",
    "stability_of",
]


@dataclass(frozen=True)
class Stability:
    """The stability threshold of an optimizer at its current state.

    Attributes:
        threshold: Threshold on ``λ_max(P^-1/2 (H + D) P^-1/2)`` (``D = coupled_decay``, 0 if
            ``None``) for ``η_ref = param_groups[0]["lr"]``.
        preconditioned: ``True`` for diagonally preconditioned optimizers (Adam family) and for
            any optimizer whose ``P`` is not the identity (per-group lr, unmanaged parameters).
        preconditioner: Per-parameter diagonal of ``P`` (same shape and dtype as each measured
            parameter, ``+inf`` for frozen entries), or ``None``: identity when
            ``preconditioned`` is ``False``, not yet available when it is ``True``.
        rule: Short human-readable rule, e.g. ``"heavy ball (2+2β)/η, β=0.9, η=0.1"``.
        inverse_sqrt: For a non-diagonal ``P`` (``preconditioner`` is then ``None``): maps a list
            of tensors aligned with the measured parameters to ``P^-1/2`` applied to them
            (``P`` symmetric positive definite, as frozen at the optimizer's last step).
        coupled_decay: Per-parameter diagonal of ``D``, the decay added to the gradient
            *before* ``P⁻¹`` is applied (same shapes as the parameters; possibly read-only
            broadcast views), so that the dynamics follow ``P⁻¹(H + D)``; ``None`` when there
            is none (or, with ``D`` depending on ``P``, while ``P`` is not available).
        decay_after_preconditioning: ``coupled_decay`` is added to the *preconditioned*
            operator instead: the threshold applies to ``λ_max(P^-1/2 H P^-1/2 + D)`` (K-FAC,
            whose base optimizer adds its decay after K-FAC has preconditioned the gradient).
    """

    threshold: float
    preconditioned: bool
    preconditioner: list[torch.Tensor] | None
    rule: str
    inverse_sqrt: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    coupled_decay: list[torch.Tensor] | None = None
    decay_after_preconditioning: bool = False


StabilityFn = Callable[[torch.optim.Optimizer, Sequence[torch.Tensor]], "Stability | None"]

#: ``fn(optimizer, params, base)`` refining the class rule's result ``base`` for one instance.
StabilityOverride = Callable[
    [torch.optim.Optimizer, list[torch.Tensor], "Stability | None"], "Stability | None"
]

_REGISTRY: dict[type[torch.optim.Optimizer], StabilityFn] = {}
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, StabilityOverride] = (
    weakref.WeakKeyDictionary()
)


def register_stability(optimizer_cls: type[torch.optim.Optimizer], fn: StabilityFn) -> None:
    """Register (or replace) the stability rule of an optimizer class.

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
    _REGISTRY[optimizer_cls] = fn


def stability_of(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    """Return the stability threshold and preconditioner of ``optimizer`` on ``params``.

    The rule is looked up along ``type(optimizer).__mro__``, so subclasses of a registered
    optimizer are recognised.

    Args:
        optimizer: The optimizer driving training.
        params: Ordered parameters on which the Hessian is measured; ``preconditioner[i]``
            corresponds to ``params[i]``.

    Returns:
        The :class:`Stability`, or ``None`` for an unknown optimizer or a configuration
        without a single threshold (see the module docstring).
    """
    base: Stability | None = None
    for cls in type(optimizer).__mro__:
        fn = _REGISTRY.get(cls)
        if fn is not None:
            base = fn(optimizer, list(params))
            break
    override = _ATTACHED.get(optimizer)
    return base if override is None else override(optimizer, list(params), base)


def attach_stability(optimizer: torch.optim.Optimizer, fn: StabilityOverride) -> None:
    """Attach an instance rule to ``optimizer`` (replacing any earlier one).

    :func:`stability_of` then returns ``fn(optimizer, params, base)``, ``base`` being the class
    rule's result (``None`` if there is none). The optimizer is held weakly; ``fn`` must not
    hold a strong reference to it (or the entry lives as long as the process).

    Raises:
        TypeError: If ``optimizer`` is not an optimizer or ``fn`` is not callable.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    _ATTACHED[optimizer] = fn


def detach_stability(optimizer: torch.optim.Optimizer) -> None:
    """Remove the instance rule of ``optimizer`` (no-op if none is attached)."""
    _ATTACHED.pop(optimizer, None)


# --------------------------------------------------------------------------- shared helpers


def _locate(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[dict[str, Any] | None]:
    """The param group managing each of ``params`` (``None`` when unmanaged)."""
    owner: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner.setdefault(id(p), group)
    return [owner.get(id(p)) for p in params]


def _active(groups: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Distinct groups that hold a measured parameter and have a positive lr."""
    seen: dict[int, dict[str, Any]] = {}
    for g in groups:
        if g is not None and float(g["lr"]) > 0.0:
            seen.setdefault(id(g), g)
    return list(seen.values())


def _agree(groups: list[dict[str, Any]], keys: Sequence[str]) -> bool:
    """Whether every group has the same values under ``keys`` (tensors compared as floats)."""

    def norm(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return float(v)
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        return v

    return all(norm(g.get(k)) == norm(groups[0].get(k)) for g in groups for k in keys)


def _lr_scale(group: dict[str, Any] | None, eta_ref: float) -> float:
    """``η_ref / η_g`` for a managing group; ``+inf`` if frozen or unmanaged."""
    if group is None:
        return math.inf
    eta = float(group["lr"])
    return math.inf if eta <= 0.0 else eta_ref / eta


def _wd_note(groups: list[dict[str, Any]], decoupled: bool) -> str:
    wds = sorted({float(g.get("weight_decay", 0.0)) for g in groups} - {0.0})
    if not wds:
        return ""
    vals = ",".join(f"{w:g}" for w in wds)
    if decoupled:
        return f"; decoupled weight_decay={vals} ignored (edge lower by η·wd/2, relative)"
    return f"; L2 weight_decay={vals}: threshold applies to H + D (coupled_decay)"


def _coupled_decay(
    params: Sequence[torch.Tensor],
    groups: list[dict[str, Any] | None],
    factors: Sequence[torch.Tensor | float] | None = None,
) -> list[torch.Tensor] | None:
    """``D`` as broadcast views: the group's decay (× ``factors[i]``) if it moves, else 0."""
    wds = [
        float(g.get("weight_decay", 0.0)) if g is not None and float(g["lr"]) > 0.0 else 0.0
        for g in groups
    ]
    if not any(wds):
        return None
    out = []
    for i, (p, wd) in enumerate(zip(params, wds)):
        value = wd if factors is None or wd == 0.0 else wd * factors[i]
        out.append(torch.as_tensor(value, dtype=p.dtype, device=p.device).expand(p.shape))
    return out


def _common_checks(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    if any(p.is_complex() for p in params):
        return False
    return not any(g.get("maximize", False) for g in optimizer.param_groups)


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
    if not _common_checks(optimizer, params):
        return None
    eta_ref = float(optimizer.param_groups[0]["lr"])
    if eta_ref <= 0.0:
        return None
    groups = _locate(optimizer, params)
    active = _active(groups)
    if not _agree(active, ("momentum", "dampening", "nesterov")):
        return None
    hyper = active[0] if active else optimizer.param_groups[0]
    beta = float(hyper.get("momentum", 0.0))
    damp = float(hyper.get("dampening", 0.0))
    nesterov = bool(hyper.get("nesterov", False))
    if not 0.0 <= beta < 1.0 or not 0.0 <= damp <= 1.0:
        return None
    if beta == 0.0:
        threshold, rule = 2.0 / eta_ref, f"plain GD 2/η, η={eta_ref:g}"
    elif nesterov:
        threshold = (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * eta_ref)
        rule = f"Nesterov (2+2β)/((1+2β)η), β={beta:g}, η={eta_ref:g}"
    elif damp == 0.0:
        threshold = (2.0 + 2.0 * beta) / eta_ref
        rule = f"heavy ball (2+2β)/η, β={beta:g}, η={eta_ref:g}"
    else:
        threshold = math.inf if damp == 1.0 else (2.0 + 2.0 * beta) / ((1.0 - damp) * eta_ref)
        rule = f"damped heavy ball (2+2β)/((1−d)η), β={beta:g}, d={damp:g}, η={eta_ref:g}"
    rule += _wd_note(active, decoupled=False)

    scales = [_lr_scale(g, eta_ref) for g in groups]
    decay = _coupled_decay(params, groups)
    if all(s == 1.0 for s in scales):
        return Stability(threshold, False, None, rule, coupled_decay=decay)
    precond = [
        torch.full(p.shape, s, dtype=p.dtype, device=p.device) for p, s in zip(params, scales)
    ]
    return Stability(threshold, True, precond, rule + "; per-group lr in P", coupled_decay=decay)


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
    if not _common_checks(optimizer, params):
        return None
    eta_ref = float(optimizer.param_groups[0]["lr"])
    if eta_ref <= 0.0:
        return None
    groups = _locate(optimizer, params)
    active = _active(groups)
    hyper = active[0] if active else optimizer.param_groups[0]
    beta1 = float(hyper["betas"][0])
    if any(float(g["betas"][0]) != beta1 for g in active) or not 0.0 <= beta1 < 1.0:
        return None
    decoupled = bool(hyper.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    if not _agree(active, ("decoupled_weight_decay",)):
        return None
    threshold = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * eta_ref)
    name = "AdamW" if decoupled else "Adam"
    rule = f"{name} EMA momentum (2+2β1)/((1−β1)η), β1={beta1:g}, η={eta_ref:g}"
    rule += _wd_note(active, decoupled=decoupled)

    decay = None if decoupled else _coupled_decay(params, groups)  # D does not depend on P
    states = [optimizer.state.get(p, {}) for p in params]
    if not any("step" in s for s in states):
        return Stability(threshold, True, None, rule, coupled_decay=decay)
    precond: list[torch.Tensor] = []
    for p, g, s in zip(params, groups, states):
        scale = _lr_scale(g, eta_ref)
        if g is None or "step" not in s or math.isinf(scale):
            precond.append(torch.full(p.shape, math.inf, dtype=p.dtype, device=p.device))
            continue
        b1, b2 = (float(b) for b in g["betas"])
        t = float(s["step"])
        v = s["max_exp_avg_sq"] if g.get("amsgrad", False) else s["exp_avg_sq"]
        denom = v.detach().sqrt() / math.sqrt(1.0 - b2**t) + float(g["eps"])
        precond.append((denom * ((1.0 - b1**t) * scale)).to(p.dtype))
    return Stability(threshold, True, precond, rule, coupled_decay=decay)


register_stability(torch.optim.SGD, sgd_stability)
register_stability(torch.optim.Adam, adam_stability)
register_stability(torch.optim.AdamW, adam_stability)
