"""RSG and ARSG, the (adaptive) remote stochastic gradient methods (arXiv:1905.01422).

The authors' former name for ARSG is NAMSG. The gradient is taken at the stored parameters,
which *are* the paper's remote observation points: one forward/backward per step. The update
direction mixes the EMA momentum with the fresh gradient through the observation factor
``μ`` (``observation``)::

    m ← β1 m + (1 − β1) g          (g includes L2 weight decay wd·θ, as in the paper)
    u = (1 − μ) m + μ g

RSG steps along ``u``; ARSG divides it by an adaptive diagonal preconditioner. With
``maximize`` the gradient is negated before the weight decay is added (torch's convention), so
maximising ``f`` is minimising ``−f`` exactly; the stability registry then gives ``None`` (see
its profile in :mod:`lightning_landscape.optim.profiles_ours`). Kernels live in
:mod:`lightning_landscape.optim._rsg_functional`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_landscape.checks import check_bool

from . import _rsg_functional as F
from ._base import (
    LandscapeOptimizer,
    check_beta,
    check_betas,
    check_nonneg,
    check_positive,
    state_dtype,
)

__all__ = ["ARSG", "RSG"]


class RSG(LandscapeOptimizer):
    r"""Remote stochastic gradient: ``θ ← θ − lr·((1 − μ)·m + μ·g)``, ``m`` the EMA of ``g``.

    .. code-block:: text

        g ← ∇L(θ) + wd·θ
        m ← β·m + (1 − β)·g,        m_0 = 0
        θ ← θ − lr·((1 − μ)·m + μ·g)

    Exact special cases (tested to 1e-12 in float64, with and without weight decay):

    - ``observation=0`` is ``torch.optim.SGD(lr=lr·(1−β), momentum=β)`` (heavy ball; the
      authors' docstring says ``lr/(1−β)``, the algebra gives ``lr·(1−β)``);
    - ``observation=1−β`` is ``torch.optim.SGD(lr=lr·(1−β), momentum=β, nesterov=True)``;
    - ``observation=1`` is plain SGD with step ``lr``.

    On a quadratic it diverges once ``lr·λ > 2(1 + β)/(1 − β + 2βμ)`` (registered in
    :mod:`lightning_landscape.optim.stability`).

    Args:
        params: Parameters or param-group dicts (hyperparameters may be set per group).
        lr: Learning rate ``α >= 0`` (required: the paper searches only ``α``).
        beta: Momentum EMA factor ``β`` in ``[0, 1)``.
        observation: Observation factor ``μ`` in ``[0, 1]``.
        weight_decay: L2 weight decay ``wd >= 0``, added to the gradient.
        foreach: ``True``/``False`` force the ``torch._foreach_*`` / single-tensor path;
            ``None``: foreach when all parameters of a group are on CUDA or all on CPU (there
            it runs over cache-sized buckets: ~0.6× the single-tensor step, same bits).
        maximize: Maximise the objective (``g ← −∇L(θ) + wd·θ``).

    Raises:
        ValueError: For a hyperparameter out of range; the message names it.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        >>> opt = RSG([w], lr=1.0, beta=0.9, observation=0.5)
        >>> w.grad = torch.ones(2, dtype=torch.float64)
        >>> _ = opt.step()  # m = 0.1, u = 0.5·0.1 + 0.5·1
        >>> [round(float(x), 12) for x in w.detach()]
        [-0.55, -0.55]
    """

    _foreach_on_cpu = True  # bucketed foreach on CPU (see _base.cache_blocks)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        beta: float = 0.999,
        observation: float = 0.1,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "beta": beta,
            "observation": observation,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, foreach=foreach)

    def _validate(self, group: dict[str, Any]) -> None:
        check_beta("beta", group["beta"])
        check_beta("observation", group["observation"], closed=True)
        check_nonneg("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": 0,
            "exp_avg": torch.zeros_like(
                param, dtype=state_dtype(param), memory_format=torch.preserve_format
            ),
        }

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        foreach: bool,
    ) -> None:
        fn = F.rsg_multi if foreach else F.rsg_single
        fn(
            params,
            grads,
            states,
            lr=float(group["lr"]),
            beta=float(group["beta"]),
            observation=float(group["observation"]),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group.get("maximize", False)),
        )


class ARSG(LandscapeOptimizer):
    r"""Adaptive remote stochastic gradient (ARSG, formerly NAMSG).

    With ``g ← ∇L(θ) + wd·θ``, ``m ← β1·m + (1 − β1)·g`` and
    ``v ← β2·v + (1 − β2)·g²`` (``m_0 = v_0 = 0``, ``t`` the step count):

    .. code-block:: text

        amsgrad=True  (default, the paper's):  v̂ ← max(v̂, v),  v̂_0 = ε   (ε floors v)
                                               θ ← θ − lr·((1 − μ)·m + μ·g) / √v̂
        amsgrad=False (Adam mode):             θ ← θ − lr·((1 − μ)·m/(1 − β1^t) + μ·g)
                                                          / (√v/√(1 − β2^t) + ε)

    The AMSGrad mode has no bias correction: ``ε`` is a floor on ``v`` (so ``√ε`` one on the
    denominator), not an addend. Exact special cases (tested in float64):

    - Adam mode, ``observation=0``: ``torch.optim.Adam`` (same ``lr``, ``betas``, ``eps``,
      L2 ``weight_decay``), to 1e-12;
    - Adam mode, ``observation=1−β1``: NAdam with constant momentum ``β1`` (Dozat 2016) *up
      to the bias correction*: NAdam divides the ``g`` term by ``1 − β1^t`` and the ``m`` term
      by ``1 − β1^(t+1)``, ARSG divides the ``m`` term by ``1 − β1^t`` and leaves ``g`` alone.
      Once ``β1^t`` is below float64 resolution the two are the same update as
      ``torch.optim.NAdam(momentum_decay=∞)`` (tested to 1e-12 from a transplanted state).

    Stability (registered in :mod:`lightning_landscape.optim.stability`): the RSG threshold
    ``2(1 + β1)/(lr(1 − β1 + 2β1μ))`` on ``λ_max(P^-1/2 H P^-1/2)`` with ``P = √v̂`` (AMSGrad
    mode) or the bias-corrected ``P`` of the Adam mode.

    Paper defaults: ``betas=(0.999, 0.99)``, ``observation=0.1``, ``eps=1e-8``; "fine mode"
    ``observation=0.2`` or ``eps=1e-3``; only ``lr`` is searched. See
    :class:`~lightning_landscape.callbacks.ObservationBoost` for the observation-boost schedule.

    Args:
        params: Parameters or param-group dicts (hyperparameters may be set per group).
        lr: Learning rate ``α >= 0``.
        betas: ``(β1, β2)`` in ``[0, 1)``: momentum and second-moment EMA factors.
        observation: Observation factor ``μ`` in ``[0, 1]``.
        eps: ``ε > 0``: floor on ``v`` (AMSGrad mode) or addend to ``√v̂`` (Adam mode).
        weight_decay: L2 weight decay ``wd >= 0``, added to the gradient.
        amsgrad: ``True`` for the paper's AMSGrad mode, ``False`` for the Adam mode.
        foreach: ``True``/``False`` force the ``torch._foreach_*`` / single-tensor path;
            ``None``: foreach when all parameters of a group are on CUDA or all on CPU (there
            it runs over cache-sized buckets: ~0.6× the single-tensor step, same bits).
        maximize: Maximise the objective (``g ← −∇L(θ) + wd·θ``).

    Raises:
        ValueError: For a hyperparameter out of range; the message names it.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        >>> opt = ARSG([w], lr=0.1, betas=(0.5, 0.75), observation=0.5)
        >>> w.grad = torch.full((1,), 2.0, dtype=torch.float64)
        >>> _ = opt.step()  # m = 1, v = 1, v̂ = max(1e-8, 1), u = 0.5·1 + 0.5·2
        >>> round(float(w.detach()), 12)
        -0.15
    """

    _foreach_on_cpu = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.999, 0.99),
        observation: float = 0.1,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = True,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "observation": observation,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        super().__init__(params, defaults, foreach=foreach)

    def _validate(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_beta("observation", group["observation"], closed=True)
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_bool("amsgrad", group["amsgrad"])
        check_bool("maximize", group["maximize"])

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = state_dtype(param)
        state: dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.full_like(state["exp_avg_sq"], float(group["eps"]))
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
                if "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = s["exp_avg_sq"].clamp_min(float(group["eps"]))
        beta1, beta2 = (float(b) for b in group["betas"])
        fn = F.arsg_multi if foreach else F.arsg_single
        fn(
            params,
            grads,
            states,
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            observation=float(group["observation"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group.get("maximize", False)),
        )
