"""``SampleVarianceDecay``: per-layer sample-variance fractions and their depth profile."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_landscape import panels
from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.checks import check_int, check_strings
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.variance import SampleVariance, sample_variance, select_modules
from lightning_landscape.metrics import SAMPLE_VARIANCE

__all__ = ["SampleVarianceDecay"]


class SampleVarianceDecay(MeasurementCallback):
    """Log how much of each layer's signal still distinguishes the probe samples.

    For every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (or each of ``modules``), in forward order,
    the fraction ``f = mean_units(v) / mean_units(v + m²)`` of its outputs (pre-activations)
    on the probe, with ``m``, ``v`` the per-unit sample mean and population variance over the
    probe samples (convolutions: a unit is a channel, positions count as samples); see
    :mod:`lightning_landscape.measures.variance`. At He initialisation a deep ReLU MLP keeps
    the second moment of its pre-activations while ``f`` decays with depth (1902.04942).

    Logged under ``landscape/sample_variance/``: ``<module name>`` (the fraction per layer),
    ``last_over_first`` (last layer over first), ``skipped``; and, at the first measurement
    and then at a measured step once ``profile_every_n_steps`` steps have passed since the
    last one, a depth-profile figure (fraction vs layer index) under
    ``landscape/sample_variance/profile`` (TensorBoard, rank 0).

    BatchNorm: the default is ``bn="batch"``, unlike the curvature callbacks. With running
    statistics (``bn="eval"``) a freshly initialised BatchNorm (mean 0, variance 1, weight 1,
    bias 0) is the identity, so at step 0 a BatchNorm net would show exactly the decay of the
    same net without it; the forward pass training runs normalises with batch statistics, and
    that is the one whose signal propagation matters. Each probe batch (``probe_batch_size``
    samples) is normalised with its own statistics; BatchNorm buffers are restored afterwards.

    The forward pass is the module's own training loss on each probe batch (``landscape_loss``
    or a silenced ``training_step``), so the inputs are prepared exactly as in training.

    Cost per measurement: one forward pass over the probe (no backward) plus a depth-profile
    figure when one is due; under DDP three all-gathers of the per-unit sums. Measured on the
    digits MLP 64→256→256→10 with a 1024-sample probe (``benchmarks/sample_variance.py``, 2
    CPU threads): 7.6 ms = 7.7 SGD steps on 16-sample batches (4.7× the bare forward pass:
    guard, float64 sums and reduction are fixed costs on so small a model; 2.2× on the
    SmallCNN); a figure adds ≈ 0.1 s (≈ 120 such steps), hence the rare default.

    Args:
        every_n_steps: measure every N optimizer steps (instead of the time budget).
        schedule: ``step -> bool`` deciding the measured steps (instead of the time budget).
        max_overhead: share of training wall time this callback may spend (default cadence).
        probe_size: global number of probe samples (each DDP rank holds its share).
        probe_batch_size: largest probe batch (also the BatchNorm batch with ``bn="batch"``).
        probe_dataloader: take the probe from this loader instead of the training loader.
        modules: names of the modules to measure (as in ``named_modules()`` of the
            LightningModule, e.g. ``"net.layers.0"``); default every Linear/Conv layer.
        profile_every_n_steps: steps between depth-profile figures (``None``: no figure). A
            figure costs far more than the measurement itself (matplotlib + PNG encoding), and
            its time counts against the budget, so the default draws one rarely.
        bn: ``"batch"`` (probe-batch statistics, default) or ``"eval"`` (running statistics).
        dropout: keep dropout active while measuring.
        seed: seed inside the measurement (identical on all ranks).
        name, strict: as in :class:`~lightning_landscape.callbacks.Sharpness`.

    Example::

        >>> cb = SampleVarianceDecay(every_n_steps=100, modules=["net.layers.0"])
        >>> cb.bn
        'batch'
        >>> SampleVarianceDecay(modules="net.layers.0")
        Traceback (most recent call last):
        ...
        ValueError: `modules` must be a non-empty list of module names or None, got 'net.layers.0'
    """

    family = "sample_variance"
    metrics = SAMPLE_VARIANCE

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float = 0.025,
        probe_size: int = 1024,
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        modules: Sequence[str] | None = None,
        profile_every_n_steps: int | None = 5000,
        bn: BNMode = "batch",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(ProbeOptions.pick(locals()))
        check_strings("modules", modules, what="a non-empty list of module names", none=True)
        check_int("profile_every_n_steps", profile_every_n_steps, none=True)
        self.modules = None if modules is None else list(modules)
        self.profile_every_n_steps = profile_every_n_steps
        self.last_result: SampleVariance | None = None
        self._last_profile_step: int | None = None

    @override
    def state_key_parts(self) -> dict[str, Any]:
        return dict(
            family=self.family,
            name=self.name,
            probe_size=self.probe_size,
            bn=self.bn,
            modules=self.modules,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        select_modules(pl_module, self.modules)  # unknown names fail before training starts

    @override
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        assert ctx.probe is not None
        result = sample_variance(
            ctx.pl_module, ctx.probe, forward=ctx.loss_fn, modules=self.modules
        )
        self.last_result = result
        out = result.as_dict()
        ratio = result.last_over_first
        if ratio == ratio:  # not NaN (the first layer's fraction is 0)
            out["last_over_first"] = ratio
        if self._profile_due(ctx.step):
            self._last_profile_step = ctx.step
            if panels.tensorboard_logger(ctx.trainer) is not None and ctx.trainer.is_global_zero:
                figure = panels.profile_figure(
                    list(result.names),
                    list(result.fractions),
                    title=f"Sample variance by layer, step {ctx.step}",
                    ylabel="var / (var + mean²)",
                )
                panels.log_figure(ctx.trainer, self.tag("profile"), figure, ctx.step)
        return out

    def _profile_due(self, step: int) -> bool:
        every = self.profile_every_n_steps
        if every is None:
            return False
        return self._last_profile_step is None or step - self._last_profile_step >= every

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_profile_step": self._last_profile_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_profile_step = state_dict.get("last_profile_step")
