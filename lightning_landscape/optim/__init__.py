"""Optimizers and their stability thresholds (pure torch)."""

from __future__ import annotations

from . import stability_ours  # noqa: F401  (registers NovoGrad, RSG, ARSG)
from .kfac import KFACPreconditioner
from .novograd import NovoGrad
from .rsg import ARSG, RSG
from .stability import Stability, register_stability, stability_of

__all__ = [
    "ARSG",
    "RSG",
    "KFACPreconditioner",
    "NovoGrad",
    "Stability",
    "register_stability",
    "stability_of",
]
