"""Optimizers and their stability thresholds (pure torch)."""

from __future__ import annotations

from lightning_landscape.optim import stability_ours  # noqa: F401  (registers NovoGrad, RSG, ARSG)
from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.novograd import NovoGrad
from lightning_landscape.optim.rsg import ARSG, RSG
from lightning_landscape.optim.stability import Stability, register_stability, stability_of

__all__ = [
    "ARSG",
    "RSG",
    "KFACPreconditioner",
    "NovoGrad",
    "Stability",
    "register_stability",
    "stability_of",
]
