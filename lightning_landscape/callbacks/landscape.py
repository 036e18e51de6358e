"""``LossLandscape``: filter-normalised loss surfaces and the init → now interpolation."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from typing_extensions import override

from lightning_landscape import panels
from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.cadence import Cadence
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.schedule import AtEnd, AtSteps, EveryNEpochs, Schedule, Trigger
from lightning_landscape.checks import (
    check_bool,
    check_choice,
    check_int,
    check_steps,
    check_that,
)
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.landscape import (
    Interpolation,
    LossSurface,
    Progress,
    filter_normalized_directions,
    grid_coordinates,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.metrics import LANDSCAPE

__all__ = ["LossLandscape"]

_INIT = "init/"  # prefix of the initial weights in ``vectors`` (checkpointed by the base class)


def _finite_copy(values: np.ndarray) -> np.ndarray:
    """``values`` with non-finite entries replaced by the largest finite one (for drawing)."""
    finite = np.isfinite(values)
    if finite.all():
        return values
    return np.where(finite, values, values[finite].max())


@contextlib.contextmanager
def _progress_bar(trainer: pl.Trainer, total: int) -> Iterator[Progress | None]:
    """A bar for the grid evaluation on the trainer's own progress-bar machinery, rank 0 only.

    A ``TQDMProgressBar`` gets a tqdm bar on the line below its main bar; a bar exposing a rich
    ``progress`` (``RichProgressBar``) gets a task in it; otherwise (disabled, another kind,
    other ranks) nothing is shown.
    """
    bar = trainer.progress_bar_callback
    if bar is None or not getattr(bar, "is_enabled", False) or not trainer.is_global_zero:
        yield None
        return
    rich = getattr(bar, "progress", None)
    if rich is not None and callable(getattr(rich, "add_task", None)):
        task = rich.add_task("Loss landscape", total=total)
        try:
            yield lambda done, _total: rich.update(task, completed=done)
        finally:
            rich.remove_task(task)
        return
    if isinstance(bar, pl.callbacks.TQDMProgressBar):
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        position = 2 * bar.process_position + 1  # the line below the main bar, like validation
        tqdm = Tqdm(
            desc="Loss landscape", total=total, position=position, leave=False, file=sys.stdout
        )
        try:
            yield lambda done, _total: tqdm.update(done - tqdm.n)
        finally:
            tqdm.close()
        return
    yield None


class LossLandscape(MeasurementCallback):
    """Loss surface around the weights on filter-normalised random directions, and the
    straight line from the initial weights (Li et al. 2018, 1712.09913).

    At each scheduled point the probe loss is evaluated on ``θ + α d1`` (``dims=1``) or on the
    grid ``θ + α d1 + β d2`` (``dims=2``), ``α, β ∈ [-span, span]`` with ``resolution`` points
    per axis; ``d1, d2`` are Gaussian draws from ``seed`` (the same every time, on every rank),
    each filter rescaled to the norm of the same filter of θ (biases and 1-D parameters zeroed
    unless ``keep_1d``). With ``interpolate_from_init`` the
    initial weights θ0 are kept in the callback's state (checkpointed; one CPU copy of the
    trainable parameters) and the loss is also evaluated on the line θ0 → θ (buffers such as
    BatchNorm running statistics are not interpolated: they stay those of θ).

    Logged: ``landscape/landscape/barrier`` (largest loss on θ0 → θ minus the larger
    endpoint); figures to TensorBoard: ``landscape/landscape/surface`` (contour for
    ``dims=2``, curve for ``dims=1``) and ``landscape/landscape/interpolation``; on rank 0 the
    raw numbers in ``landscape_step<step>.npz`` in ``trainer.log_dir`` (or
    ``default_root_dir`` when the logger has no folder): ``alphas``, ``betas`` (2-D),
    ``losses`` (rows follow ``betas``), ``center``, ``t``, ``interpolation``, ``barrier``,
    ``step``. A bar on the trainer's progress bar (tqdm or rich) follows the evaluation.

    Schedule: ``every_n_epochs`` (at the end of every n-th training epoch), ``at_steps`` (after
    the optimizer step that brings ``global_step`` to one of them; 0 = before training) and
    ``at_end`` (in ``on_train_end``, which every rank runs once the fit loop is done, while the
    process group and loggers are still up — ``on_fit_end`` comes after teardown). A step is
    measured at most once. There is no time budget: the schedule is yours.

    Cost: one forward pass over the probe per grid point — ``resolution**dims + 1`` plus
    ``interpolation_resolution`` forward passes per measurement (see
    ``benchmarks/landscape.py``).

    BatchNorm: ``bn="batch"`` by default, unlike the curvature callbacks. Running statistics
    (``"eval"``) were averaged along the recent trajectory, not at the perturbed weights, so away
    from θ they are stale: the surface then mixes in a mismatch training never sees, and a
    BatchNorm network loses the invariance to the scale of the filters in front of it that
    filter normalisation relies on. Batch statistics (of each probe batch, ``probe_batch_size``
    samples) evaluate every point as training does. Buffers are restored either way.

    Args:
        every_n_epochs: measure at the end of every n-th epoch.
        at_steps: global steps at which to measure.
        at_end: measure once when training ends.
        dims: 1 (a line) or 2 (a surface).
        resolution: points per axis.
        span: the axes run over ``[-span, span]`` (in units of the filter-normalised
            direction: ``span=1`` moves every filter by its own norm).
        interpolate_from_init: keep θ0 and evaluate the line θ0 → θ.
        interpolation_resolution: points on that line, both ends included.
        keep_1d: keep biases and 1-D parameters in the directions (rescaled to their norm).
        chunk_size: grid points per all-reduce and per progress-bar update.
        save_npz: write the raw numbers on rank 0.
        probe_size, probe_batch_size, probe_dataloader, dropout, seed, name, strict: as in
            :class:`~lightning_landscape.callbacks.Sharpness` (``seed`` draws the directions).
        bn: ``"batch"`` (default, see above) or ``"eval"``.

    Example::

        >>> cb = LossLandscape(every_n_epochs=5, resolution=11)
        >>> LossLandscape(dims=3)
        Traceback (most recent call last):
        ...
        ValueError: `dims` must be 1 or 2, got 3
    """

    family = "landscape"
    metrics = LANDSCAPE
    logs_without_scalars = True

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        at_steps: Sequence[int] | None = None,
        at_end: bool = True,
        dims: int = 2,
        resolution: int = 21,
        span: float = 1.0,
        interpolate_from_init: bool = True,
        interpolation_resolution: int = 21,
        keep_1d: bool = False,
        chunk_size: int = 32,
        save_npz: bool = True,
        probe_size: int = 1024,
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        bn: BNMode = "batch",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        check_int("every_n_epochs", every_n_epochs, none=True)
        steps = check_steps("at_steps", at_steps)
        for flag_name, flag in {
            "at_end": at_end,
            "interpolate_from_init": interpolate_from_init,
            "keep_1d": keep_1d,
            "save_npz": save_npz,
        }.items():
            check_bool(flag_name, flag)
        if every_n_epochs is None and not steps and not at_end:
            raise ValueError(
                "`at_end` is False and neither `every_n_epochs` nor `at_steps` is set: "
                "nothing would ever be measured"
            )
        check_choice("dims", dims, (1, 2))
        check_that("dims", dims, not isinstance(dims, bool), "1 or 2")
        grid_coordinates(resolution, span)  # validates `resolution` and `span`
        check_int("interpolation_resolution", interpolation_resolution, 2)
        check_int("chunk_size", chunk_size)

        def timing(cadence: Cadence) -> Schedule:
            triggers: list[Trigger] = [AtSteps(steps)]
            if every_n_epochs is not None:
                triggers.append(EveryNEpochs(every_n_epochs))
            if at_end:
                triggers.append(AtEnd())
            return Schedule({"surface": triggers}, cadence, once_per_step=True)

        # no budget: the cadence only keeps the accounting (points, seconds)
        super().__init__(ProbeOptions.pick(locals()), timing=timing)
        self.every_n_epochs = every_n_epochs
        self.at_steps = steps
        self.at_end = at_end
        self.dims = dims
        self.resolution = resolution
        self.span = float(span)
        self.interpolate_from_init = interpolate_from_init
        self.interpolation_resolution = interpolation_resolution
        self.keep_1d = keep_1d
        self.chunk_size = chunk_size
        self.save_npz = save_npz
        self.last_surface: LossSurface | None = None
        self.last_interpolation: Interpolation | None = None
        self.last_file: str | None = None

    @property
    def measured_step(self) -> int:
        """The last step measured (a step is measured at most once; checkpointed)."""
        return self.timing.measured_step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer):
            self._keep_initial(trainer, pl_module)
        super().on_train_start(trainer, pl_module)  # probe, clocks, layout, step 0 if scheduled

    def _keep_initial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep θ0 in the (checkpointed) state at the start of training."""
        has_init = any(k.startswith(_INIT) for k in self.vectors)
        if self.interpolate_from_init and not has_init:
            if trainer.global_step == 0:
                for name, p in pl_module.named_parameters():
                    if p.requires_grad:
                        self.vectors[_INIT + name] = p.detach().cpu().clone()
            else:
                self.warn_once(
                    "LossLandscape: training resumed without the initial weights in the "
                    "callback state (was it attached from the start?); no interpolation or "
                    "barrier will be logged."
                )

    # -- measuring ---------------------------------------------------------------------------
    def _initial_vector(self, names: list[str]) -> torch.Tensor | None:
        keys = [_INIT + n for n in names]
        if not all(k in self.vectors for k in keys):
            if any(k.startswith(_INIT) for k in self.vectors):
                self.warn_once(
                    "LossLandscape: the stored initial weights do not match the model's "
                    "trainable parameters; no interpolation or barrier is logged."
                )
            return None
        return torch.cat([self.vectors[k].reshape(-1) for k in keys])

    @override
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        self.last_surface = self.last_interpolation = None
        op = ctx.operator()
        theta0 = self._initial_vector(op.names) if self.interpolate_from_init else None
        grid = self.resolution**self.dims + 1
        total = grid + (self.interpolation_resolution if theta0 is not None else 0)
        with _progress_bar(ctx.trainer, total) as bar:
            dirs = filter_normalized_directions(
                op.parameters, count=self.dims, seed=self.seed, keep_1d=self.keep_1d
            )
            surface = loss_surface(
                op, dirs, resolution=self.resolution, span=self.span, chunk_size=self.chunk_size,
                progress=bar,
            )  # fmt: skip
            interp = None
            if theta0 is not None:
                shifted = None if bar is None else (lambda done, _n: bar(grid + done, total))
                interp = linear_interpolation(
                    op, theta0, resolution=self.interpolation_resolution,
                    chunk_size=self.chunk_size, progress=shifted,
                )  # fmt: skip
        self.last_surface, self.last_interpolation = surface, interp
        return {} if interp is None else {"barrier": interp.barrier}

    @override
    def on_logged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        surface, interp = self.last_surface, self.last_interpolation
        if surface is None:
            return  # skipped (non-finite loss at θ): the same on every rank
        step = trainer.global_step
        if self.save_npz:
            folder = trainer.log_dir or trainer.default_root_dir  # log_dir: all ranks, broadcast
            if trainer.is_global_zero:
                self.last_file = self._save(folder, step, surface, interp)
        if panels.tensorboard_logger(trainer) is None or not trainer.is_global_zero:
            return
        losses = _finite_copy(surface.losses.numpy())
        if surface.betas is None:
            fig = panels.curve_figure(
                surface.alphas.tolist(),
                {"probe loss": losses.tolist()},
                title=f"Loss along a filter-normalised direction, step {step}",
                marks={"current weights": 0.0},
            )
        else:
            fig = panels.contour_figure(
                surface.alphas.tolist(),
                surface.betas.tolist(),
                losses.tolist(),
                title=f"Loss landscape, step {step}",
            )
        panels.log_figure(trainer, self.tag("surface"), fig, step)
        if interp is not None:
            fig = panels.curve_figure(
                interp.t.tolist(),
                {"probe loss": _finite_copy(interp.losses.numpy()).tolist()},
                title=f"Initial -> current weights, barrier {interp.barrier:.3g}",
                xlabel=f"t (0: initial weights, 1: step {step})",
            )
            panels.log_figure(trainer, self.tag("interpolation"), fig, step)

    def _save(
        self, folder: str, step: int, surface: LossSurface, interp: Interpolation | None
    ) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"landscape_step{step}.npz")
        arrays: dict[str, Any] = dict(
            step=step, alphas=surface.alphas.numpy(), losses=surface.losses.numpy(),
            center=surface.center, span=self.span, seed=self.seed, keep_1d=self.keep_1d,
            bn=self.bn,
        )  # fmt: skip
        if surface.betas is not None:
            arrays["betas"] = surface.betas.numpy()
        if interp is not None:
            arrays.update(
                t=interp.t.numpy(), interpolation=interp.losses.numpy(), barrier=interp.barrier
            )
        np.savez(path, **arrays)
        return path
