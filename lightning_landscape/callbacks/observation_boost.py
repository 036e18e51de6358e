"""``ObservationBoost``: the observation-boost schedule of RSG/ARSG (arXiv:1905.01422).

The paper starts with a small observation factor (``μ = 0.05``) and a large step size; when the
loss flattens it doubles ``μ`` and divides the step size by about 4 (``α ← 0.247 α``), which
keeps the effective step large while moving the update towards the fresh gradient.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_landscape.checks import check_int, check_number, check_that

__all__ = ["ObservationBoost"]


class ObservationBoost(Callback):
    """On a plateau of ``monitor``: ``observation ← factor_mu · observation``, ``lr ← factor_lr · lr``.

    Acts on every param group of every optimizer of the trainer that has an ``observation``
    hyperparameter (:class:`~lightning_landscape.optim.RSG`,
    :class:`~lightning_landscape.optim.ARSG`). Once per training epoch (``on_train_epoch_end``)
    the monitored value is compared with the best so far (lower is better): an improvement is
    ``value < best − min_delta·|best|``. After ``patience`` epochs without one, each group's
    ``observation`` is multiplied by ``factor_mu`` (capped at ``max_observation``) and its
    ``lr`` (and ``initial_lr``, which LR schedulers start from) by ``factor_lr``; a group already
    at ``max_observation`` is left alone. A group with ``observation = 0`` is never boosted
    (start from ``μ > 0``; the paper uses 0.05).

    The value: with ``average_over_epoch`` (default) the mean of ``trainer.callback_metrics
    [monitor]`` over the training batches of the epoch — right for a metric logged every step,
    such as the zoo's ``train_loss``; otherwise the value at the end of the epoch — right for
    epoch-level metrics (``val_loss`` when validating every epoch, ``train_loss_epoch``). Under
    DDP the value is averaged over the ranks, so every rank makes the same decision. The
    hyperparameters live in the optimizer's param groups (checkpointed with it); the callback
    checkpoints its plateau counters.

    Args:
        monitor: Name of the logged metric.
        patience: Epochs without improvement before a boost (``>= 1``).
        factor_mu: Multiplier of ``observation`` (``> 1``).
        factor_lr: Multiplier of ``lr`` (in ``(0, 1]``).
        max_observation: Cap on ``observation`` (in ``(0, 1]``).
        min_delta: Relative improvement that resets the patience (``>= 0``).
        average_over_epoch: Average the per-batch values of the epoch (see above).
        verbose: Announce each boost (rank 0).

    Raises:
        ValueError: For an argument out of range; the message names it.

    Example::

        >>> boost = ObservationBoost(patience=3, max_observation=0.2)
        >>> boost.boosts, boost.best
        (0, inf)
    """

    def __init__(
        self,
        *,
        monitor: str = "train_loss",
        patience: int = 5,
        factor_mu: float = 2.0,
        factor_lr: float = 0.247,
        max_observation: float = 0.4,
        min_delta: float = 1e-3,
        average_over_epoch: bool = True,
        verbose: bool = True,
    ) -> None:
        check_that(
            "monitor", monitor, isinstance(monitor, str) and bool(monitor), "a non-empty string"
        )
        check_int("patience", patience)
        check_number("factor_mu", factor_mu, low=1.0)
        check_number("factor_lr", factor_lr, high=1.0, include_high=True)
        check_number("max_observation", max_observation, high=1.0, include_high=True)
        check_number("min_delta", min_delta, include_low=True)
        self.monitor = monitor
        self.patience = patience
        self.factor_mu = float(factor_mu)
        self.factor_lr = float(factor_lr)
        self.max_observation = float(max_observation)
        self.min_delta = float(min_delta)
        self.average_over_epoch = bool(average_over_epoch)
        self.verbose = bool(verbose)
        self.best = math.inf
        self.wait = 0
        self.boosts = 0
        self.history: list[dict[str, Any]] = []
        self._sum = 0.0
        self._count = 0
        self._warned = False

    # -- hooks --------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._count = 0.0, 0

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if self.average_over_epoch and value is not None:
            self._sum += float(value)
            self._count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        groups = _boostable_groups(trainer)
        if not groups:
            self._warn(f"no optimizer param group has an `observation`; {self._name} does nothing")
            return
        last = trainer.callback_metrics.get(self.monitor)
        if self.average_over_epoch and self._count > 0:
            local = self._sum / self._count
        elif last is not None:
            local = float(last)
        else:
            local = math.nan
        # every rank takes the same decision on the mean value (NaN: metric missing somewhere)
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        local_t = torch.tensor(local, dtype=dtype, device=device)
        value = float(trainer.strategy.reduce(local_t, reduce_op="mean"))
        if math.isnan(value):
            self._warn(f"{self._name}: metric {self.monitor!r} was not logged; no boost")
            return
        if value < self.best - self.min_delta * abs(self.best) or math.isinf(self.best):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.wait = 0
            self._boost(trainer, groups, value)

    # -- the boost ----------------------------------------------------------------------------
    def _boost(self, trainer: pl.Trainer, groups: list[dict[str, Any]], value: float) -> None:
        changed = 0
        for group in groups:
            mu = float(group["observation"])
            new_mu = min(self.factor_mu * mu, self.max_observation)
            if new_mu <= mu:
                continue
            group["observation"] = new_mu
            group["lr"] = group["lr"] * self.factor_lr
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * self.factor_lr
            changed += 1
        if not changed:
            return
        self.boosts += 1
        first = groups[0]
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "value": value,
            "observation": float(first["observation"]),
            "lr": float(first["lr"]),
        }
        self.history.append(record)
        if self.verbose:
            rank_zero_info(
                f"{self._name}: {self.monitor} plateaued at {value:.6g}; boost {self.boosts}: "
                f"observation -> {record['observation']:g}, lr -> {record['lr']:g}"
            )

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _warn(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(message)
            self._warned = True

    # -- checkpointing ------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "boosts": self.boosts,
            "history": [dict(h) for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.wait = int(state_dict["wait"])
        self.boosts = int(state_dict["boosts"])
        self.history = [dict(h) for h in state_dict["history"]]


def _boostable_groups(trainer: pl.Trainer) -> list[dict[str, Any]]:
    return [g for opt in trainer.optimizers for g in opt.param_groups if "observation" in g]
