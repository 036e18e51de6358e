"""``KFAC``: the Lightning plugin of :class:`~lightning_landscape.optim.kfac.KFACPreconditioner`.

Adding ``KFAC()`` to a Trainer turns the optimizer the pipeline already has (SGD + momentum is
the usual choice) into K-FAC: the preconditioner is built at fit start on the LightningModule
and ``trainer.optimizers[0]``, and steps in ``on_before_optimizer_step`` — after the DDP
gradient reduction, gradient accumulation and AMP unscaling, before gradient clipping and
``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_landscape import panels
from lightning_landscape.callbacks.context import Pausable
from lightning_landscape.checks import check_bool, check_choice, check_int, check_regex
from lightning_landscape.metrics import KFAC as KFAC_METRICS
from lightning_landscape.optim.kfac import KFACPreconditioner, StepInfo
from lightning_landscape.optim.kfac.hyper import Hyper

__all__ = ["KFAC"]

Schedule = float | Callable[[int], float]


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or ``optimizer``)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class KFAC(Callback, Pausable):
    """K-FAC preconditioning of ``trainer.optimizers[0]`` (see ``KFACPreconditioner``).

    The preconditioner records statistics only in training forwards (not in validation, not in
    the forwards of measurement callbacks: it is :class:`~lightning_landscape.callbacks.Pausable`,
    and their guard enters :meth:`paused`), combines every
    micro-batch of an optimizer step (``accumulate_grad_batches``) and, with ``16-mixed``,
    divides the output gradients by the ``GradScaler``'s scale and drops steps the scaler skips.
    Its state (factors, eigenbases, step counter) is checkpointed with the trainer. Layers
    holding a tied parameter (``lm_head.weight = embed.weight``) are skipped with one warning
    and step with the plain optimizer; a module called several times per forward is
    KFAC-expand over its calls.

    Logged under ``landscape/kfac/`` through ``trainer.loggers`` at ``step=global_step`` (the
    step being taken), only when there is something new: ``kl_scale`` and ``damping`` on
    factor/inverse-update steps and every ``log_every_n_steps`` steps, ``factor_seconds`` on
    factor updates, ``inverse_seconds`` on inverse updates, ``skipped_layers`` when the number
    of skipped layers changes (first at the first update). With a ``Sharpness`` callback,
    ``landscape/sharpness/preconditioned`` is λ_max of the K-FAC-preconditioned Hessian and
    ``threshold`` the base optimizer's threshold divided by the KL scale.

    Args:
        damping: ``λ > 0`` (number or callable of the K-FAC step).
        factor_decay: running-average decay ``ξ`` in ``[0, 1)``.
        factor_update_every: update the factors every T optimizer steps.
        inverse_update_every: recompute the eigendecompositions every T optimizer steps.
        kl_clip: ``κ`` of KL clipping, or ``None``; ``η`` is read from the optimizer.
        lr: ``η`` for KL clipping instead of the optimizer's group-0 lr.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over examples.
        layers: regex on module names (relative to the LightningModule) to register.
        skip: regex on module names never to register.
        damping_mode: ``"exact"`` or ``"pi"``.
        distribute_inverses: spread the eigendecompositions over DDP ranks.

    Example::

        >>> cb = KFAC(damping=1e-2, factor_update_every=5, inverse_update_every=50)
        >>> KFAC(factor_decay=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `factor_decay` must be a number in [0, 1) or a callable of the step, got 1.5
    """

    #: What this callback logs (see :mod:`lightning_landscape.metrics`).
    metrics = KFAC_METRICS

    def __init__(
        self,
        *,
        damping: Schedule = 1e-3,
        factor_decay: Schedule = 0.95,
        factor_update_every: int = 10,
        inverse_update_every: int = 100,
        kl_clip: Schedule | None = 1e-3,
        lr: Schedule | None = None,
        loss_reduction: str = "mean",
        layers: str | None = None,
        skip: str | None = None,
        damping_mode: str = "exact",
        distribute_inverses: bool = False,
    ) -> None:
        Hyper("damping", damping, low=0.0)
        Hyper("factor_decay", factor_decay, low=0.0, high=1.0, closed_low=True)
        check_int("factor_update_every", factor_update_every)
        check_int("inverse_update_every", inverse_update_every)
        if kl_clip is not None:
            Hyper("kl_clip", kl_clip, low=0.0)
        if lr is not None:
            Hyper("lr", lr, low=0.0)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        check_choice("damping_mode", damping_mode, ("exact", "pi"))
        check_regex("layers", layers)
        check_regex("skip", skip)
        check_bool("distribute_inverses", distribute_inverses)
        self.hyper: dict[str, Any] = dict(
            damping=damping,
            factor_decay=factor_decay,
            factor_update_every=factor_update_every,
            inverse_update_every=inverse_update_every,
            kl_clip=kl_clip,
            lr=lr,
            loss_reduction=loss_reduction,
            layers=layers,
            skip=skip,
            damping_mode=damping_mode,
            distribute_inverses=distribute_inverses,
        )
        self.preconditioner: KFACPreconditioner | None = None
        self._pending: dict[str, Any] | None = None
        self._logged_skipped: int | None = None

    # -- building ----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove()
            self.preconditioner = None
        optimizers = trainer.optimizers
        if not optimizers:
            rank_zero_warn(
                "KFAC: the trainer has no optimizer; K-FAC is inactive", category=UserWarning
            )
            return
        if len(optimizers) > 1:
            rank_zero_warn(
                "KFAC: preconditioning the first of several optimizers", category=UserWarning
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.preconditioner = KFACPreconditioner(
            pl_module, optimizer=optimizers[0], grad_scaler=scaler, **self.hyper
        )
        if self._pending is not None:
            self.preconditioner.load_state_dict(self._pending)
            self._pending = None
        self._logged_skipped = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        panels.write_layout(trainer, panels.FAMILY_CHARTS["kfac"])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove()  # the state stays readable (state_dict)

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which forwards and backwards do not reach the K-FAC statistics."""
        if self.preconditioner is None:
            return contextlib.nullcontext()
        return self.preconditioner.paused()

    # -- stepping ----------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pre = self.preconditioner
        if pre is None or unwrap(optimizer) is not pre.optimizer:
            return
        pre.step()
        self._log(trainer, pre.info)

    def _log(self, trainer: pl.Trainer, info: StepInfo) -> None:
        pre = self.preconditioner
        assert pre is not None
        metrics: dict[str, float] = {}
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        if info.preconditioned and (
            info.factors_updated or info.inverses_updated or trainer.global_step % every == 0
        ):
            if pre.kl_clip is not None:
                metrics["kl_scale"] = info.kl_scale
            metrics["damping"] = info.damping
        if info.factors_updated:
            metrics["factor_seconds"] = info.factor_seconds
        if info.inverses_updated:
            metrics["inverse_seconds"] = info.inverse_seconds
        if info.factors_updated and len(pre.skipped) != self._logged_skipped:
            self._logged_skipped = len(pre.skipped)
            metrics["skipped_layers"] = float(len(pre.skipped))
        if not metrics:
            return
        scalars = {f"landscape/kfac/{k}": float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.preconditioner is not None:
            return self.preconditioner.state_dict()
        return dict(self._pending or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
