"""Small checks and facts the measurement callbacks share: argument validation (a
``ValueError`` that names the argument and the value), the run's length, device sync."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["check_name", "positive_int", "run_length", "sync"]

_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an ``int`` ≥ 1 (``bool`` is not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_name(name: Any) -> None:
    """Raise unless ``name`` is ``None`` or a tag segment (``landscape/<name>/...``)."""
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ValueError(
            "`name` must be None or a non-empty tag segment of letters, digits, '_', '.', '-' "
            f"(and inner '/'), got {name!r}"
        )


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
