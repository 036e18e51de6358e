"""Optimizers and their profiles: stability thresholds, preconditioners, flow steps (pure torch).

Importing this package registers the profiles of torch's SGD/Adam/AdamW
(:mod:`.profiles_torch`) and of RSG/ARSG/NovoGrad (:mod:`.profiles_ours`); K-FAC attaches its
own to the optimizer it preconditions (:mod:`.kfac.profile`). A new optimizer class is
registered with :func:`register_optimizer` (``docs/guides/register_optimizer.md``).
"""

from __future__ import annotations

from . import profiles_ours, profiles_torch  # noqa: F401  (register the built-in profiles)
from .kfac import KFACPreconditioner
from .novograd import NovoGrad
from .profile import (
    Momentum,
    OptimizerProfile,
    Stability,
    WeightDecay,
    attach_profile,
    detach_profile,
    profile_for,
    register_optimizer,
)
from .rsg import ARSG, RSG
from .stability import register_stability, stability_of

__all__ = [
    "ARSG",
    "RSG",
    "KFACPreconditioner",
    "Momentum",
    "NovoGrad",
    "OptimizerProfile",
    "Stability",
    "WeightDecay",
    "attach_profile",
    "detach_profile",
    "profile_for",
    "register_optimizer",
    "register_stability",
    "stability_of",
]
