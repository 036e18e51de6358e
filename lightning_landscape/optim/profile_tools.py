"""Building blocks for :attr:`OptimizerProfile.stability` functions (param groups, ``P``, ``D``).

They implement the conventions of :mod:`lightning_landscape.optim.stability`: the group that
manages each measured parameter, the *active* groups (holding a measured parameter with
``η_g > 0``), the lr ratio ``η_ref/η_g`` folded into ``P`` (``+inf`` when frozen or unmanaged)
and the coupled decay ``D``. Public so that a user's profile follows the same conventions.

Example::

    >>> import torch
    >>> w, u = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    >>> sgd = torch.optim.SGD([{"params": [w]}, {"params": [u], "lr": 0.05}], lr=0.1)
    >>> [lr_scale(g, 0.1) for g in locate(sgd, [w, u])]
    [1.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .profile import WeightDecay

__all__ = [
    "active",
    "agree",
    "common_checks",
    "coupled_decay",
    "decay_kind",
    "full",
    "locate",
    "lr_scale",
    "setup",
    "wd_note",
]

Group = dict[str, Any]


def locate(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[Group | None]:
    """The param group managing each of ``params`` (``None`` when unmanaged)."""
    owner: dict[int, Group] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner.setdefault(id(p), group)
    return [owner.get(id(p)) for p in params]


def active(groups: list[Group | None]) -> list[Group]:
    """Distinct groups that hold a measured parameter and have a positive lr."""
    seen: dict[int, Group] = {}
    for g in groups:
        if g is not None and float(g["lr"]) > 0.0:
            seen.setdefault(id(g), g)
    return list(seen.values())


def agree(groups: list[Group], keys: Sequence[str]) -> bool:
    """Whether every group has the same values under ``keys`` (tensors compared as floats)."""

    def norm(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return float(v)
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        return v

    return all(norm(g.get(k)) == norm(groups[0].get(k)) for g in groups for k in keys)


def lr_scale(group: Group | None, eta_ref: float) -> float:
    """``η_ref / η_g`` for a managing group; ``+inf`` if frozen or unmanaged."""
    if group is None:
        return math.inf
    eta = float(group["lr"])
    return math.inf if eta <= 0.0 else eta_ref / eta


def decay_kind(groups: list[Group], kind: WeightDecay) -> WeightDecay:
    """``kind`` if some of ``groups`` has a nonzero ``weight_decay``, else ``NONE``."""
    if any(float(g.get("weight_decay", 0.0)) != 0.0 for g in groups):
        return kind
    return WeightDecay.NONE


def wd_note(groups: list[Group], decoupled: bool) -> str:
    """The rule-string note on the groups' weight decay (empty without one)."""
    wds = sorted({float(g.get("weight_decay", 0.0)) for g in groups} - {0.0})
    if not wds:
        return ""
    vals = ",".join(f"{w:g}" for w in wds)
    if decoupled:
        return f"; decoupled weight_decay={vals} ignored (edge lower by η·wd/2, relative)"
    return f"; L2 weight_decay={vals}: threshold applies to H + D (coupled_decay)"


def coupled_decay(
    params: Sequence[torch.Tensor],
    groups: list[Group | None],
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


def common_checks(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """``False`` for complex parameters or ``maximize`` in any group (no threshold)."""
    if any(p.is_complex() for p in params):
        return False
    return not any(g.get("maximize", False) for g in optimizer.param_groups)


def setup(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], keys: Sequence[str]
) -> tuple[float, list[Group | None], list[Group], Group] | None:
    """``(η_ref, owning groups, active groups, hyper group)``, or ``None`` (no single threshold).

    ``None`` after :func:`common_checks`, for ``η_ref <= 0``, or when the active groups disagree
    on ``keys``; the hyper group is the first active one (group 0 when none is active).
    """
    if not common_checks(optimizer, params):
        return None
    eta_ref = float(optimizer.param_groups[0]["lr"])
    if eta_ref <= 0.0:
        return None
    groups = locate(optimizer, params)
    act = active(groups)
    if not agree(act, keys):
        return None
    return eta_ref, groups, act, act[0] if act else optimizer.param_groups[0]


def full(p: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """``value`` (a number or a tensor broadcastable to ``p``) as a tensor shaped like ``p``."""
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if isinstance(value, torch.Tensor):
        return out.copy_(value)
    return out.fill_(value)
