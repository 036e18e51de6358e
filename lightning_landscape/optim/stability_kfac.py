"""Backwards-compatible name of :mod:`lightning_landscape.optim.kfac.profile`."""

from __future__ import annotations

from .kfac.profile import attach, attached_kfac, detach, kfac_stability

__all__ = ["attach", "attached_kfac", "detach", "kfac_stability"]
