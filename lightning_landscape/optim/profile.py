"""Optimizer profiles: everything the suite knows about one optimizer family, in one object.

A :class:`OptimizerProfile` says how to read an optimizer's preconditioner ``P`` and stability
threshold from its state (:attr:`~OptimizerProfile.stability`, returning a :class:`Stability`
whose momentum form and weight-decay kind are structured fields), the effective step ``κ`` of
the gradient flow it discretises and the bias correction that turns its ``P`` into the flow's,
and when these are valid. Register one per optimizer class with :func:`register_optimizer`;
:func:`profile_for` finds it (along the MRO, so subclasses inherit it). ``Sharpness``,
``GradientFlowDeviation`` and the K-FAC plugin read optimizers through profiles only.

Profiles live next to what they describe: torch's SGD/Adam/AdamW in
:mod:`~lightning_landscape.optim.profiles_torch`, RSG/ARSG/NovoGrad in
:mod:`~lightning_landscape.optim.profiles_ours`, K-FAC's (built from the base optimizer's) in
:mod:`~lightning_landscape.optim.kfac.profile`. A profile can also be attached to one optimizer
*instance* (:func:`attach_profile`; K-FAC does this for the optimizer it preconditions); the
instance's profile wins over its class's. The user guide is ``docs/guides/register_optimizer.md``.

Example::

    >>> import torch
    >>> round(Momentum("heavy_ball", beta=0.9).threshold(0.1), 9)  # (2+2β)/η
    38.0
    >>> profile_for(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)).name
    'torch.optim.SGD'
"""

from __future__ import annotations

import enum
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "Momentum",
    "OptimizerProfile",
    "Stability",
    "WeightDecay",
    "attach_profile",
    "attached_profile",
    "detach_profile",
    "profile_for",
    "profile_for_class",
    "register_optimizer",
]


class WeightDecay(str, enum.Enum):
    """Where an optimizer's ``weight_decay`` enters its update.

    - ``COUPLED`` (L2): ``wd·θ`` is added to the gradient before ``P⁻¹``; the dynamics follow
      ``P⁻¹(H + D)`` (SGD, Adam, RSG, ARSG). Flow: ``−P⁻¹(∇L + wd·θ)``.
    - ``PRECONDITIONED``: added to the *preconditioned* gradient, inside the momentum
      (NovoGrad; a base optimizer's L2 decay under K-FAC): ``P⁻¹H + D``. Flow: ``−P⁻¹∇L − wd·θ``.
    - ``DECOUPLED``: ``θ ← (1 − η·wd)θ`` outside the update direction (AdamW): not part of the
      threshold (it lowers the edge by the relative ``η·wd/2``). Flow: ``−P⁻¹∇L − wd·θ``.
    - ``NONE``: the optimizer has no weight decay (or it is 0 on every active group).
    """

    NONE = "none"
    COUPLED = "coupled"
    PRECONDITIONED = "preconditioned"
    DECOUPLED = "decoupled"


MomentumForm = Literal["none", "heavy_ball", "nesterov", "ema", "rsg"]


@dataclass(frozen=True)
class Momentum:
    """The search direction ``u`` of ``θ ← θ − η P⁻¹ u``, which fixes the stability threshold.

    Forms (``g`` the gradient, ``b``/``m`` the buffer; thresholds on ``λ_max(P^-1/2 H P^-1/2)``):

    - ``"none"``: ``u = g``: ``2/η``;
    - ``"heavy_ball"``: ``b ← βb + (1−d)g``, ``u = b``: ``(2+2β)/((1−d)η)`` (``+inf`` at d = 1);
    - ``"nesterov"``: ``u = g + βb``: ``(2+2β)/((1+2β)η)``;
    - ``"ema"``: ``m ← βm + (1−β)g``, ``u = m``: ``(2+2β)/((1−β)η)``;
    - ``"rsg"``: ``u = (1−μ)m + μg`` on the EMA: ``2(1+β)/(η(1−β+2βμ))``.

    Attributes:
        form: One of the forms above.
        beta: The momentum ``β`` (``β1`` of Adam-like methods).
        dampening: ``d`` of the heavy ball.
        observation: ``μ`` of the RSG form.
    """

    form: MomentumForm
    beta: float = 0.0
    dampening: float = 0.0
    observation: float = 0.0

    def __post_init__(self) -> None:
        if self.form not in ("none", "heavy_ball", "nesterov", "ema", "rsg"):
            raise ValueError(
                "`form` must be 'none', 'heavy_ball', 'nesterov', 'ema' or 'rsg', "
                f"got {self.form!r}"
            )

    def threshold(self, lr: float) -> float:
        """The stability threshold for the step ``lr`` (``η``)."""
        b = self.beta
        if self.form == "none":
            return 2.0 / lr
        if self.form == "heavy_ball":
            d = self.dampening
            if d == 0.0:
                return (2.0 + 2.0 * b) / lr
            return math.inf if d == 1.0 else (2.0 + 2.0 * b) / ((1.0 - d) * lr)
        if self.form == "nesterov":
            return (2.0 + 2.0 * b) / ((1.0 + 2.0 * b) * lr)
        if self.form == "ema":
            return (2.0 + 2.0 * b) / ((1.0 - b) * lr)
        return 2.0 * (1.0 + b) / (lr * (1.0 - b + 2.0 * b * self.observation))


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
        momentum: The search direction the threshold was derived from (``None``: not given).
        weight_decay: Where the active groups' (nonzero) weight decay enters the update.
    """

    threshold: float
    preconditioned: bool
    preconditioner: list[torch.Tensor] | None
    rule: str
    inverse_sqrt: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    coupled_decay: list[torch.Tensor] | None = None
    decay_after_preconditioning: bool = False
    momentum: Momentum | None = None
    weight_decay: WeightDecay = WeightDecay.NONE


#: ``fn(optimizer, params) -> Stability | None`` (see :mod:`lightning_landscape.optim.stability`).
StabilityFn = Callable[[torch.optim.Optimizer, Sequence[torch.Tensor]], "Stability | None"]
#: ``fn(optimizer) -> κ | None``.
ScaleFn = Callable[[torch.optim.Optimizer], "float | None"]
#: ``fn(optimizer, group, state) -> factor`` turning a parameter's ``P`` into the flow's.
BiasFn = Callable[[torch.optim.Optimizer, dict[str, Any], dict[str, Any]], float]
#: ``fn(optimizer, group) -> WeightDecay``: the kind of one param group's decay.
DecayFn = Callable[[torch.optim.Optimizer, dict[str, Any]], WeightDecay]


@dataclass(frozen=True)
class OptimizerProfile:
    """Everything the suite knows about one optimizer family.

    Attributes:
        name: A readable name (``"torch.optim.SGD"``).
        stability: ``fn(optimizer, params) -> Stability | None``: the diagonal preconditioner
            ``P`` (or ``inverse_sqrt`` for an operator), the threshold with its
            :class:`Momentum` form and the :class:`WeightDecay` kind, aligned with ``params``
            (``None``: no single threshold in this configuration).
        effective_scale: ``fn(optimizer) -> κ | None``: one step of lr ``η`` is an Euler step of
            the gradient flow of length ``κη`` (steady-state ratio of the update direction to
            the gradient). ``None`` (the field): no gradient-flow rule is known.
        bias_correction: ``fn(optimizer, group, state) -> factor`` multiplying a parameter's
            ``P`` into the flow's (undoing an explicit bias correction, e.g. Adam's
            ``1/(1−β1^t)``); ``None``: factor 1.
        weight_decay: The :class:`WeightDecay` kind of every group, or ``fn(optimizer, group)``
            when it depends on the group (``Adam(decoupled_weight_decay=...)``).
        needs_state: ``P`` is read from the optimizer's state: it is not available before the
            first step (``Stability(preconditioned=True, preconditioner=None)``).
        bias_corrected: ``P`` or ``κ`` carry factors such as ``1 − β^t`` that settle over the
            first ~``1/(1−β)`` steps: measurements should skip those (``settle_steps``).
        operator: ``P`` is a non-diagonal operator (K-FAC's ``inverse_sqrt``): the gradient-flow
            deviation, which needs a diagonal ``P``, is not supported.
    """

    name: str
    stability: StabilityFn
    effective_scale: ScaleFn | None = None
    bias_correction: BiasFn | None = None
    weight_decay: WeightDecay | DecayFn = WeightDecay.COUPLED
    needs_state: bool = False
    bias_corrected: bool = False
    operator: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` must be a non-empty string, got {self.name!r}")
        for field in ("stability", "effective_scale", "bias_correction"):
            value = getattr(self, field)
            if not (callable(value) or (value is None and field != "stability")):
                raise TypeError(f"`{field}` must be callable, got {value!r}")
        if not (isinstance(self.weight_decay, WeightDecay) or callable(self.weight_decay)):
            raise TypeError(
                f"`weight_decay` must be a WeightDecay or callable, got {self.weight_decay!r}"
            )

    def kappa(self, optimizer: torch.optim.Optimizer) -> float | None:
        """``κ`` of ``optimizer`` (``None``: no rule, or none in this configuration)."""
        return None if self.effective_scale is None else self.effective_scale(optimizer)

    def flow_factor(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any], state: dict[str, Any]
    ) -> float:
        """The factor turning a parameter's ``P`` into the flow's (1 without a correction)."""
        if self.bias_correction is None:
            return 1.0
        return self.bias_correction(optimizer, group, state)

    def decay_kind(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> WeightDecay:
        """The :class:`WeightDecay` kind of ``group``'s ``weight_decay``."""
        if isinstance(self.weight_decay, WeightDecay):
            return self.weight_decay
        return self.weight_decay(optimizer, group)


_PROFILES: dict[type[torch.optim.Optimizer], OptimizerProfile] = {}
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerProfile] = (
    weakref.WeakKeyDictionary()
)


def _check_class(optimizer_cls: Any) -> None:
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )


def register_optimizer(
    optimizer_cls: type[torch.optim.Optimizer], profile: OptimizerProfile
) -> None:
    """Register (or replace) the profile of an optimizer class.

    Args:
        optimizer_cls: A subclass of ``torch.optim.Optimizer``; its subclasses inherit the
            profile unless they register their own.
        profile: The :class:`OptimizerProfile`.

    Raises:
        TypeError: If ``optimizer_cls`` is not an optimizer class or ``profile`` not a profile.
    """
    _check_class(optimizer_cls)
    if not isinstance(profile, OptimizerProfile):
        raise TypeError(f"profile must be an OptimizerProfile, got {profile!r}")
    _PROFILES[optimizer_cls] = profile


def profile_for_class(optimizer_cls: type[torch.optim.Optimizer]) -> OptimizerProfile | None:
    """The profile registered for ``optimizer_cls`` or its nearest base (``None`` if none)."""
    _check_class(optimizer_cls)
    for cls in optimizer_cls.__mro__:
        profile = _PROFILES.get(cls)
        if profile is not None:
            return profile
    return None


def profile_for(optimizer: torch.optim.Optimizer) -> OptimizerProfile | None:
    """The profile of ``optimizer``: its attached one (:func:`attach_profile`), else its class's.

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    attached = _ATTACHED.get(optimizer)
    return attached if attached is not None else profile_for_class(type(optimizer))


def attach_profile(optimizer: torch.optim.Optimizer, profile: OptimizerProfile) -> None:
    """Give one optimizer *instance* its own profile (replacing any earlier attachment).

    Used when something outside the optimizer changes what it does, e.g. K-FAC preconditioning
    its gradients. The optimizer is held weakly; ``profile`` must not hold a strong reference to
    it (or the entry lives as long as the process).

    Raises:
        TypeError: If ``optimizer`` is not an optimizer or ``profile`` not a profile.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if not isinstance(profile, OptimizerProfile):
        raise TypeError(f"profile must be an OptimizerProfile, got {profile!r}")
    _ATTACHED[optimizer] = profile


def attached_profile(optimizer: torch.optim.Optimizer) -> OptimizerProfile | None:
    """The profile attached to ``optimizer`` (``None`` if there is none)."""
    return _ATTACHED.get(optimizer)


def detach_profile(
    optimizer: torch.optim.Optimizer, profile: OptimizerProfile | None = None
) -> None:
    """Remove the instance profile of ``optimizer`` (only if it is ``profile``, when given)."""
    if profile is None or _ATTACHED.get(optimizer) is profile:
        _ATTACHED.pop(optimizer, None)
