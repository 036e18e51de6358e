"""Backwards-compatible name of :mod:`lightning_landscape.optim.profiles_ours`."""

from __future__ import annotations

from .profiles_ours import arsg_stability, novograd_stability, rsg_stability

__all__ = ["arsg_stability", "novograd_stability", "rsg_stability"]
