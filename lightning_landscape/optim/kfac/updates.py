"""What K-FAC does to all its layers at once: factor updates, eigen updates, damped products.

- :func:`update_factors` — sums each layer's window (output statistics made per-example and
  divided by the squared loss scale), all-reduces every layer's sums *and* example counts in a
  single collective, normalises once and folds the result into the running averages;
- :func:`update_inverses` — eigendecomposes every factor, optionally one owner rank per layer
  (assigned by cost) with the results shared through one all-reduce of owner values and zeros
  (exact: ``x + 0 = x``);
- :func:`precondition` — the damped inverse on every layer's gradient, KL-clipped;
- :func:`inverse_sqrt` — ``P^{-1/2}`` on a per-parameter list of vectors (for stability).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import distributed as D
from .factors import DampingMode
from .layer import KFACLayer

__all__ = [
    "gradients_finite",
    "inverse_sqrt",
    "precondition",
    "update_factors",
    "update_inverses",
]


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient of ``model`` is finite (one synchronisation)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def update_factors(
    layers: Sequence[KFACLayer],
    *,
    per_example: bool,
    loss_scale: float,
    decay: float,
    group: Any = None,
) -> list[str] | None:
    """Fold the recorded window into the running factors of every layer.

    Args:
        layers: The layers (every rank passes the same list, in the same order).
        per_example: ``loss_reduction="mean"``: multiply output gradients by the local number
            of examples of the window (undoing the mean).
        loss_scale: The AMP loss scale of the recorded backward passes (1 without AMP).
        decay: ``ξ`` of the running averages.
        group: Process group of the all-reduce.

    Returns:
        Names of layers that have no factors and got no statistics (their hooks never fired),
        or ``None`` if the reduced statistics were not finite (nothing was changed).
    """
    local: list[torch.Tensor] = []
    for layer in layers:
        scale = float(layer.g_count) ** 2 if per_example else 1.0
        local += layer.window(scale / loss_scale**2)
    reduced = D.all_reduce_sum(local, group)
    if reduced and not bool(torch.stack([t.sum() for t in reduced]).isfinite().all()):
        return None  # (a sum is finite iff every entry is, short of overflowing the dtype)
    counts = torch.stack(reduced[2::3]).tolist() if reduced else []
    silent: list[str] = []
    for layer, a, g, (n_a, n_g) in zip(layers, reduced[0::3], reduced[1::3], counts):
        if n_a == 0 or n_g == 0:
            if layer.A is None:
                silent.append(layer.name)
            continue
        layer.update(a / n_a, g / n_g, decay)
    return silent


def update_inverses(layers: Sequence[KFACLayer], *, distribute: bool, group: Any = None) -> bool:
    """Recompute the eigenbases of every layer with factors; ``False`` if there is none."""
    layers = [layer for layer in layers if layer.A is not None]
    world = D.world_size(group)
    if not distribute or world == 1:
        for layer in layers:
            layer.set_eigen(*layer.decompose())
        return bool(layers)
    owner = D.owners([layer.eigen_cost() for layer in layers], world)
    me = D.rank(group)
    parts: list[torch.Tensor] = []
    for layer, rank in zip(layers, owner):
        if rank == me:
            parts += list(layer.decompose())
            continue
        for dim in (layer.dim_a, layer.dim_g):  # zeros shaped like (d, Q)
            parts.append(torch.zeros(dim, dtype=layer.dtype, device=layer.device))
            parts.append(torch.zeros(dim, dim, dtype=layer.dtype, device=layer.device))
    shared = D.all_reduce_sum(parts, group)
    for i, layer in enumerate(layers):
        layer.set_eigen(*(t.clone() for t in shared[4 * i : 4 * i + 4]))
    return bool(layers)


def precondition(
    layers: Sequence[KFACLayer],
    damping: float,
    mode: DampingMode,
    *,
    kl_clip: float | None,
    lr: float,
) -> float | None:
    """Replace each ready layer's gradient by ``ν · P⁻¹ ∇``; returns ``ν`` (``None``: no layer).

    ``ν = min(1, √(κ / (η² Σ_layers ⟨P⁻¹∇, ∇⟩)))`` with ``κ = kl_clip`` (1 when ``kl_clip`` is
    ``None``, ``η <= 0`` or the sum is not positive).
    """
    work = []
    for layer in layers:
        solved = layer.solve(damping, mode) if layer.ready else None
        if solved is not None:
            work.append((layer, solved[0], solved[1]))
    if not work:
        return None
    nu = 1.0
    if kl_clip is not None:
        vg = float(torch.stack([v.to(torch.float64) for _, _, v in work]).sum())
        if lr > 0.0 and vg > 0.0:
            nu = min(1.0, math.sqrt(kl_clip / (lr**2 * vg)))
    for layer, solved, _ in work:
        layer.write(solved, nu, mode)
    return nu


def inverse_sqrt(
    layers: Sequence[KFACLayer],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    damping: float,
    mode: DampingMode,
) -> list[torch.Tensor]:
    """``P^{-1/2}`` applied to ``vectors`` (aligned with ``params``); identity off the layers.

    A layer whose weight or bias is not in ``params`` is treated as if the missing part of the
    vector were zero.
    """
    out = list(vectors)
    index = {id(p): i for i, p in enumerate(params)}
    for layer in layers:
        slots = [index.get(id(p)) for p in layer.params]
        if not layer.ready or all(s is None for s in slots):
            continue
        pieces = [
            torch.zeros(p.shape, dtype=layer.dtype, device=layer.device)
            if s is None
            else vectors[s].to(layer.dtype)
            for p, s in zip(layer.params, slots)
        ]
        m = pieces[0].reshape(layer.dim_g, -1)
        bias = len(pieces) > 1  # a bias-free layer has no bias column
        if bias:
            m = torch.cat([m, pieces[1].unsqueeze(1)], dim=1)
        r = layer.apply(m, damping, mode, power=-0.5)
        results = [r[:, :-1], r[:, -1]] if bias else [r]
        for s, p, res in zip(slots, layer.params, results):
            if s is not None:
                out[s] = res.reshape(p.shape).to(vectors[s].dtype)
    return out
