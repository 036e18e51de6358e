"""The options every measurement callback shares, as one object: :class:`ProbeOptions`.

Each callback still declares them as flat keyword arguments with type hints and defaults
(LightningCLI/jsonargparse read ``__init__`` signatures, so recipes and YAML configs keep
``every_n_steps: 20``), and hands them over in one line::

    super().__init__(ProbeOptions.pick(locals()))

:meth:`ProbeOptions.pick` takes the arguments named like a field (a callback that does not
declare one, e.g. ``LossLandscape`` without a cadence, gets the field's default); the
validation lives here once.

Example::

    >>> ProbeOptions(probe_size=64, bn="batch").bn
    'batch'
    >>> ProbeOptions(bn="train")
    Traceback (most recent call last):
    ...
    ValueError: `bn` must be 'eval' or 'batch', got 'train'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_landscape.callbacks.cadence import Cadence
from lightning_landscape.checks import check_choice, check_int, check_tag, check_that, is_int
from lightning_landscape.measures.guard import BNMode

__all__ = ["ProbeOptions"]


@dataclass
class ProbeOptions:
    """Cadence (when), probe (on what), guard (how) and identity options of a measurement.

    Attributes:
        every_n_steps: measure every N optimizer steps (instead of the time budget).
        schedule: ``step -> bool`` deciding the measured steps (instead of the time budget).
        max_overhead: share of training wall time the callback may spend (default cadence).
        min_points: fewest points the budget should give (a warning otherwise).
        probe_size: global number of probe samples (``"auto"``: sized to the budget).
        probe_batch_size: largest probe batch.
        probe_dataloader: take the probe from this loader instead of the training loader.
        bn: ``"eval"`` (running statistics) or ``"batch"`` (probe-batch statistics).
        dropout: keep dropout active while measuring.
        seed: seed inside the measurement (identical on all ranks).
        name: the tag segment ``landscape/<name>/...`` (default: the callback's family).
        strict: re-raise an exception inside a measurement instead of skipping it.
    """

    every_n_steps: int | None = None
    schedule: Callable[[int], bool] | None = None
    max_overhead: float = 0.025
    min_points: int = 16
    probe_size: int | Literal["auto"] = "auto"
    probe_batch_size: int = 256
    probe_dataloader: Any = None
    bn: BNMode = "eval"
    dropout: bool = False
    seed: int = 0
    name: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        check_tag("name", self.name)
        if self.probe_size != "auto":
            check_int("probe_size", self.probe_size)
        check_int("probe_batch_size", self.probe_batch_size)
        check_choice("bn", self.bn, ("eval", "batch"))
        check_that("seed", self.seed, is_int(self.seed), "an integer")
        self.dropout = bool(self.dropout)
        self.strict = bool(self.strict)
        self.cadence()  # validates every_n_steps, schedule, max_overhead, min_points

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> ProbeOptions:
        """The options among ``arguments`` (e.g. a callback's ``locals()``), by field name."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in arguments.items() if k in names})

    def cadence(self) -> Cadence:
        """A fresh :class:`~lightning_landscape.callbacks.cadence.Cadence` of these options."""
        return Cadence(
            every_n_steps=self.every_n_steps,
            schedule=self.schedule,
            max_overhead=self.max_overhead,
            min_points=self.min_points,
        )
