"""Single-tensor and ``torch._foreach_*`` kernels of RSG and ARSG (see :mod:`.rsg`).

Both paths run the same operations in the same order, so on CPU (where the foreach ops loop
over the tensors) they agree bit for bit. ``p.grad`` is only read: the gradient plus L2 weight
decay is a new tensor. With ``maximize`` the gradient is negated first and the decay added
after (torch's convention): maximising ``f`` is then minimising ``−f`` bit for bit. On CPU the
foreach path runs its ops over cache-sized buckets of tensor slices
(:func:`~lightning_landscape.optim._base.cache_blocks`) instead of streaming every state tensor
through memory once per op (same bits: every element sees the same operations).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._base import cache_blocks, group_by_device_and_dtype

__all__ = ["arsg_multi", "arsg_single", "rsg_multi", "rsg_single"]


def _grad(
    g: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, wd: float, maximize: bool
) -> torch.Tensor:
    """``±g + wd·θ`` in the state dtype, never in place on ``p.grad``."""
    g = g.to(dtype)
    if maximize:
        g = torch.neg(g)
    return g.add(p, alpha=wd) if wd != 0.0 else g


def _grads(
    gs: list[torch.Tensor], ps: list[torch.Tensor], dtype: torch.dtype, wd: float, maximize: bool
) -> Any:
    if gs[0].dtype != dtype:
        gs = [g.to(dtype) for g in gs]
    if maximize:
        gs = list(torch._foreach_neg(gs))
    return torch._foreach_add(gs, ps, alpha=wd) if wd != 0.0 else gs


def rsg_single(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta: float,
    observation: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """``m ← β m + (1−β) g;  θ ← θ − lr((1−μ) m + μ g)``, one tensor at a time."""
    for p, grad, state in zip(params, grads, states):
        m = state["exp_avg"]
        g = _grad(grad, p, m.dtype, weight_decay, maximize)
        state["step"] += 1
        m.lerp_(g, 1.0 - beta)
        p.add_(m, alpha=-lr * (1.0 - observation))
        if observation != 0.0:
            p.add_(g, alpha=-lr * observation)


def rsg_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta: float,
    observation: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """The foreach version of :func:`rsg_single`."""
    for ps_all, gs_all, sts in group_by_device_and_dtype(params, grads, states):
        for s in sts:
            s["step"] += 1
        ms_all = [s["exp_avg"] for s in sts]
        for _, (ps, gs_raw, ms) in _buckets([ps_all, gs_all, ms_all]):
            gs = _grads(gs_raw, ps, ms[0].dtype, weight_decay, maximize)
            torch._foreach_lerp_(ms, gs, 1.0 - beta)
            torch._foreach_add_(ps, ms, alpha=-lr * (1.0 - observation))
            if observation != 0.0:
                torch._foreach_add_(ps, gs, alpha=-lr * observation)


def _buckets(lists: list[list[torch.Tensor]]) -> list[tuple[list[int], list[list[torch.Tensor]]]]:
    """:func:`cache_blocks` on CPU; one bucket of the whole lists elsewhere (fused kernels)."""
    if lists[0][0].device.type == "cpu":
        return cache_blocks(lists)
    return [(list(range(len(lists[0]))), lists)]


def arsg_single(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    observation: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool = False,
) -> None:
    """ARSG, one tensor at a time.

    AMSGrad mode: ``θ ← θ − lr((1−μ) m + μ g)/√v̂`` with ``v̂ = max(v̂, v)``, ``v̂_0 = ε``.
    Adam mode: ``θ ← θ − lr((1−μ) m/(1−β1^t) + μ g)/(√v/√(1−β2^t) + ε)``.
    """
    for p, grad, state in zip(params, grads, states):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = _grad(grad, p, m.dtype, weight_decay, maximize)
        state["step"] += 1
        t = state["step"]
        m.lerp_(g, 1.0 - beta1)  # one pass over m (mul_ + add_ take two)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if amsgrad:
            vmax = state["max_exp_avg_sq"]
            torch.maximum(vmax, v, out=vmax)
            denom = vmax.sqrt()
            m_coef = -lr * (1.0 - observation)
        else:
            denom = v.sqrt().div_(math.sqrt(1.0 - beta2**t)).add_(eps)
            m_coef = -lr * (1.0 - observation) / (1.0 - beta1**t)
        p.addcdiv_(m, denom, value=m_coef)
        if observation != 0.0:
            p.addcdiv_(g, denom, value=-lr * observation)


def arsg_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    observation: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool = False,
) -> None:
    """The foreach version of :func:`arsg_single`."""
    for ps_all, gs_all, sts in group_by_device_and_dtype(params, grads, states):
        for s in sts:
            s["step"] += 1
        lists = [ps_all, gs_all, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts]]
        if amsgrad:
            lists.append([s["max_exp_avg_sq"] for s in sts])
        steps_all = [s["step"] for s in sts]
        for index, bucket in _buckets(lists):  # on CPU: a cache-sized bucket at a time
            ps, gs_raw, ms, vs = bucket[:4]
            gs = _grads(gs_raw, ps, ms[0].dtype, weight_decay, maximize)
            torch._foreach_lerp_(ms, gs, 1.0 - beta1)  # one pass over m (mul_ + add_ take two)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
            if amsgrad:
                torch._foreach_maximum_(bucket[4], vs)
                denoms = torch._foreach_sqrt(bucket[4])
                m_coefs = [-lr * (1.0 - observation)] * len(ps)
            else:
                steps = [steps_all[i] for i in index]
                denoms = torch._foreach_sqrt(vs)
                torch._foreach_div_(denoms, [math.sqrt(1.0 - beta2**t) for t in steps])
                torch._foreach_add_(denoms, eps)
                m_coefs = [-lr * (1.0 - observation) / (1.0 - beta1**t) for t in steps]
            torch._foreach_addcdiv_(ps, ms, denoms, m_coefs)
            if observation != 0.0:
                torch._foreach_addcdiv_(ps, gs, denoms, value=-lr * observation)
