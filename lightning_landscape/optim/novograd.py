"""NovoGrad (Ginsburg et al. 2019, arXiv:1905.11286): layer-wise second moments.

One "layer" is one parameter tensor. See :class:`NovoGrad` for the equations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_landscape.checks import check_bool

from ._base import (
    LandscapeOptimizer,
    check_betas,
    check_nonneg,
    check_positive,
    group_by_device_and_dtype,
    state_dtype,
)

__all__ = ["NovoGrad"]


class NovoGrad(LandscapeOptimizer):
    r"""NovoGrad: SGD with momentum on gradients normalised by a per-tensor second moment.

    For every parameter tensor ``θ`` (a "layer") with gradient ``g`` at step ``t``:

    .. code-block:: text

        v_t = ‖g_t‖²                                     (t = 1)
        v_t = β2 · v_{t−1} + (1 − β2) · ‖g_t‖²           (t > 1)     one scalar per tensor
        m_t = β1 · m_{t−1} + s · (g_t / (√v_t + ε) + d · θ_{t−1}),     m_0 = 0
        θ_t = θ_{t−1} − lr · m_t

    with ``d = weight_decay`` and ``s = 1 − β1`` if ``grad_averaging`` else ``s = 1``. The first
    step is therefore ``m_1 = s · (g_1 / (‖g_1‖ + ε) + d · θ_0)``: the ``(1 − β1)`` factor
    applies from the first step on, as in torch-optimizer (NVIDIA's OpenSeq2Seq and
    pytorch_optimizer instead omit it on the first step when ``grad_averaging``; with
    ``grad_averaging=False`` all of them agree). With ``amsgrad`` the running maximum
    ``v̂_t = max(v̂_{t−1}, v_t)`` replaces ``v_t`` in the denominator. With ``maximize`` the
    gradient ``g`` is negated first.

    The first step is recognised from the optimizer state (``state["step"] == 0``), never from
    ``v == 0``, so an all-zero gradient does not re-initialise ``v`` (and, ``ε > 0``, stays
    finite). Norms are accumulated in float32 (float64 for float64 parameters); the state of
    float16/bfloat16 parameters is float32. ``p.grad`` is never modified. State per tensor: the
    momentum ``exp_avg`` (parameter-sized) and the scalar ``exp_avg_sq`` (plus
    ``max_exp_avg_sq`` with ``amsgrad``), about half of Adam's.

    Stability (registered in :mod:`lightning_landscape.optim.stability`): with
    ``P = √v + ε`` frozen this is heavy-ball momentum in the preconditioned space, stable while
    ``λ_max(P^-1/2 H P^-1/2) < (2 + 2β1) / (s · lr)``.

    Args:
        params: Parameters or param-group dicts (every hyperparameter below may be set per group).
        lr: Learning rate ``>= 0``.
        betas: ``(β1, β2)``, each in ``[0, 1)``: momentum and second-moment decay.
        eps: ``ε > 0`` added to ``√v``.
        weight_decay: ``d >= 0``, added to the normalised gradient (see the equations).
        grad_averaging: Multiply the bracket by ``1 − β1``.
        amsgrad: Use the running maximum of ``v``.
        foreach: ``True`` for the ``torch._foreach_*`` path, ``False`` for the single-tensor
            path, ``None``: foreach when all parameters of a group are on CUDA.
        maximize: Maximise the objective.

    Raises:
        ValueError: For a hyperparameter out of range; the message names it.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
        >>> opt = NovoGrad([w], lr=0.1, betas=(0.9, 0.5))
        >>> w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> _ = opt.step()  # v = ‖g‖² = 25, m = g / (5 + 1e-8)
        >>> float(opt.state[w]["exp_avg_sq"]), [round(float(x), 6) for x in w.detach()]
        (25.0, [2.94, 3.92])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_averaging: bool = False,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "grad_averaging": grad_averaging,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        super().__init__(params, defaults, foreach=foreach)

    def _validate(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        for name in ("grad_averaging", "amsgrad", "maximize"):
            check_bool(name, group[name])

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = state_dtype(param)
        state: dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros((), dtype=dtype, device=param.device),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros((), dtype=dtype, device=param.device)
        return state

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        foreach: bool,
    ) -> None:
        if group["amsgrad"]:
            for s in states:  # amsgrad switched on after the state was created
                s.setdefault("max_exp_avg_sq", torch.zeros_like(s["exp_avg_sq"]))
        beta1, beta2 = (float(b) for b in group["betas"])
        fn = _multi_tensor_novograd if foreach else _single_tensor_novograd
        fn(
            params,
            grads,
            states,
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            scale=(1.0 - beta1) if group["grad_averaging"] else 1.0,
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )


def _single_tensor_novograd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """The reference path, one tensor at a time (see :class:`NovoGrad` for the equations)."""
    for p, g, state in zip(params, grads, states):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        sq = torch.linalg.vector_norm(g, dtype=v.dtype).square()
        if state["step"] == 0:
            v.copy_(sq)
        else:
            v.mul_(beta2).add_(sq, alpha=1.0 - beta2)
        state["step"] += 1
        if amsgrad:
            torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        denom = v.sqrt().add_(eps)
        # m ← β1 m + s (±g / denom + d θ); the sign of g only (torch's maximize convention)
        m.mul_(beta1).addcdiv_(g, denom, value=-scale if maximize else scale)
        if weight_decay != 0.0:
            m.add_(p, alpha=scale * weight_decay)
        p.add_(m, alpha=-lr)


def _multi_tensor_novograd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """The ``torch._foreach_*`` path; the same operations as the single-tensor path."""
    for ps, gs, sts in group_by_device_and_dtype(params, grads, states):
        ms = [s["exp_avg"] for s in sts]
        vs = [s["exp_avg_sq"] for s in sts]
        norms = torch._foreach_norm(gs, 2, dtype=vs[0].dtype)
        sqs = torch._foreach_mul(norms, norms)
        later = [i for i, s in enumerate(sts) if s["step"] > 0]
        for i, s in enumerate(sts):
            if s["step"] == 0:
                vs[i].copy_(sqs[i])
            s["step"] += 1
        if later:
            v_later = [vs[i] for i in later]
            torch._foreach_mul_(v_later, beta2)
            torch._foreach_add_(v_later, [sqs[i] for i in later], alpha=1.0 - beta2)
        if amsgrad:
            vmax = [s["max_exp_avg_sq"] for s in sts]
            torch._foreach_maximum_(vmax, vs)
            vs = vmax
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, eps)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_addcdiv_(ms, gs, denoms, value=-scale if maximize else scale)
        if weight_decay != 0.0:
            torch._foreach_add_(ms, ps, alpha=scale * weight_decay)
        torch._foreach_add_(ps, ms, alpha=-lr)
