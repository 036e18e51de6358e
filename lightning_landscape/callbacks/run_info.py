"""Small facts the measurement callbacks share: the run's length, device sync.

(Argument checks live in :mod:`lightning_landscape.checks`, shared with ``measures/``.)"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

__all__ = ["run_length", "sync"]


def run_length(trainer: pl.Trainer) -> int | None:
    """``trainer.estimated_stepping_batches`` when finite (``None``: unknown)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # e.g. an iterable dataset without a length and no max_steps
        return None
    return int(total) if isinstance(total, (int, float)) and total < float("inf") else None


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA), so wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
