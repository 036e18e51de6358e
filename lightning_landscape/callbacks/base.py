"""The shared Lightning shell of every measurement: cadence, probe, guard, failure, logging.

A subclass implements :meth:`MeasurementCallback.measure` — a pure computation on a
:class:`MeasureContext` returning ``{quantity: value}`` — and :meth:`charts`. The base class:

- captures the probe at ``on_train_start`` (after the sanity check; each rank its own shard of
  ``probe_size / world_size`` samples, without consuming the training RNG) and measures once at
  step 0 before the first optimizer step;
- then measures in ``on_train_batch_end`` after the optimizer step, at the steps chosen by its
  :class:`~lightning_landscape.callbacks.cadence.Cadence` (``every_n_steps``, ``schedule`` or the
  default wall-time budget ``max_overhead``);
- runs the measurement inside :func:`~lightning_landscape.measures.guard.guard`, so training is
  bit-identical with and without the callback;
- never ends training: any exception while measuring is a skip with one warning per cause and a
  ``skipped`` count, decided collectively under DDP (:mod:`~lightning_landscape.callbacks.failures`);
  an out-of-memory error frees what the measurement held and retries once with half-size probe
  batches; ``strict=True`` re-raises instead;
- logs ``landscape/<name>/<quantity>`` (``name`` defaults to the family, so two instances of one
  callback can coexist) through ``trainer.loggers`` at ``step=global_step``, only on measured
  steps, and writes the TensorBoard "Landscape" layout once;
- does nothing under ``fast_dev_run``; checkpoints its counters, cadence and warm-start vectors.

The state shared by the callbacks of one fit (probes, solves, warm starts) is created in
``setup`` and dropped in ``teardown``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_landscape import panels
from lightning_landscape.callbacks import probing, reporting
from lightning_landscape.callbacks.cadence import Cadence
from lightning_landscape.callbacks.checks import check_name, positive_int, run_length, sync
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.callbacks.failures import (
    FailurePolicy,
    collective_decision,
    free_memory,
    halved_probe,
)
from lightning_landscape.callbacks.shared import (
    SolveRequest,
    close_run,
    open_run,
    shared_state,
)
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.probe import Probe

__all__ = ["MeasureContext", "MeasurementCallback"]


class MeasurementCallback(Callback):
    """Base class of the measurement callbacks (see the module docstring)."""

    family: ClassVar[str] = ""
    #: Measure once at step 0, before the first optimizer step (subclasses with their own
    #: schedule, such as ``LossLandscape``, turn it off).
    measure_at_start: ClassVar[bool] = True
    #: A measurement with no scalars still produced something (figures, files): log it as a
    #: point. Otherwise an empty result means "nothing could be measured yet".
    logs_without_scalars: ClassVar[bool] = False

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float = 0.025,
        probe_size: int | Literal["auto"] = "auto",
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        bn: BNMode = "eval",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
        min_points: int = 16,
    ) -> None:
        check_name(name)
        if probe_size != "auto":
            positive_int("probe_size", probe_size)
        positive_int("probe_batch_size", probe_batch_size)
        if bn not in ("eval", "batch"):
            raise ValueError(f"`bn` must be 'eval' or 'batch', got {bn!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        self.cadence = Cadence(
            every_n_steps=every_n_steps,
            schedule=schedule,
            max_overhead=max_overhead,
            min_points=min_points,
        )
        self.probe_size: int | Literal["auto"] = probe_size
        #: the global size chosen for ``probe_size="auto"`` (``None`` until chosen)
        self.auto_size: int | None = None
        #: what the cadence planned at the first measurement, and what the run measured
        self.plan_summary: dict[str, Any] = {}
        self.run_summary: dict[str, Any] = {}
        self._capture_seconds = 0.0
        self._empty_streak = 0
        self.probe_batch_size = probe_batch_size
        self.probe_dataloader = probe_dataloader
        self.bn: BNMode = bn
        self.dropout = bool(dropout)
        self.seed = seed
        self.name: str = name if name is not None else self.family
        self.strict = bool(strict)
        self.probe: Probe | None = None
        self.failures = FailurePolicy(self._owner_name(), self.tag("skipped"))
        self.vectors: dict[str, torch.Tensor] = {}
        self.last_metrics: dict[str, float] = {}
        self.seconds = 0.0
        self._last_step = -1
        self._decision: tuple[int, bool] = (-1, False)
        self._warned: set[str] = set()
        self._shared_warm: dict[str, torch.Tensor] | None = None  # loaded, not yet handed over

    # -- what subclasses provide -----------------------------------------------------------
    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        """Compute this callback's quantities at ``ctx.step`` (inside the guard)."""
        raise NotImplementedError

    def charts(self) -> list[panels.Chart]:
        """The custom-scalars charts this callback contributes to the dashboard."""
        return []

    def solve_request(self) -> SolveRequest | None:
        """What this callback needs from the shared top-k solve (``None``: nothing)."""
        return None

    def expected_products(self) -> tuple[float, float]:
        """Hessian-vector products (or equivalent passes) of a cold and of a warm measurement.

        Only sizes an automatic probe before anything was timed; the plan then uses measured
        costs.
        """
        return 20.0, 8.0

    # -- identity ----------------------------------------------------------------------------
    def _owner_name(self) -> str:
        cls = type(self).__name__
        return cls if self.name == self.family else f"{cls}(name={self.name!r})"

    def tag(self, quantity: str) -> str:
        """The full tag of ``quantity``: ``landscape/<name>/<quantity>``."""
        return f"landscape/{self.name}/{quantity}"

    @property
    def skipped(self) -> int:
        """Measurements skipped so far (logged as ``landscape/<name>/skipped``)."""
        return self.failures.skipped

    @property
    def disabled(self) -> bool:
        """Whether this callback stopped measuring for the rest of the run (repeated failures)."""
        return self.failures.disabled

    def instance_charts(self) -> list[panels.Chart]:
        """:meth:`charts` with tags and titles of this instance (``name`` ≠ family)."""
        return panels.renamed(self.charts(), self.family, self.name)

    @property
    def probe_key(self) -> tuple[Any, ...]:
        return (self.probe_size, self.probe_batch_size, id(self.probe_dataloader))

    @property
    def solve_key(self) -> tuple[Any, ...]:
        return (*self.probe_key, self.bn, self.dropout)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            family=self.family, name=self.name, probe_size=self.probe_size, bn=self.bn
        )

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message, category=UserWarning)

    def _peers(self, trainer: pl.Trainer) -> list[MeasurementCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback)]  # type: ignore[attr-defined]

    def _owns_warm_start(self, trainer: pl.Trainer) -> bool:
        return shared_state(trainer).owners.get(self.solve_key) == id(self)

    # -- schedule ----------------------------------------------------------------------------
    def is_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether this callback measures at ``step`` (decided once per step, same on all ranks)."""
        if self._decision[0] == step:
            return self._decision[1]
        due = False
        if self.cadence.is_check(step):
            if self.cadence.budgeted:
                due, nxt = self.cadence.decide(step, busy=shared_state(trainer).busy)
                due, nxt = trainer.strategy.broadcast((due, nxt), src=0)
                self.cadence.next_check = nxt
                reporting.check_plan(self)
            else:
                due = True
        self._decision = (step, due)
        return due

    @staticmethod
    def _active(trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and not getattr(trainer, "fast_dev_run", False)

    # -- hooks -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = weakref.ref(trainer)
        peers = self._peers(trainer)
        if peers and peers[0] is self:  # the first measurement callback opens the run
            shared = open_run(trainer)
            for cb in peers:
                shared.owners.setdefault(cb.solve_key, id(cb))
        self.probe = None
        self.failures.reset_run()
        self._last_step = -1
        self._decision = (-1, False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # the shared state goes (this callback keeps a reference to its last probe for
        # inspection; the next fit captures a new one)
        peers = self._peers(trainer)
        if peers and peers[-1] is self:  # the last one closes it
            close_run(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        shared = shared_state(trainer)
        peers = self._peers(trainer)
        if peers and peers[0] is self:
            # the first measurement callback starts every clock before anything is captured or
            # measured, so each budget counts the same wall time (a shared solve is charged to
            # several) and knows the run's length
            shared.busy = 0.0
            total = run_length(trainer)
            for cb in peers:
                cb.cadence.start(trainer.global_step, total_steps=total)
        self.probe = probing.start_probe(self, trainer, pl_module)
        if self._shared_warm is not None:  # a resumed owner hands its warm start over
            for key_name, vector in self._shared_warm.items():
                if key_name == "solve":
                    shared.warm.setdefault(self.solve_key, vector)
            self._shared_warm = None
        if not shared.layout_written:
            charts = [chart for cb in peers for chart in cb.instance_charts()]
            shared.layout_written = panels.write_layout(trainer, charts) or True
        if trainer.global_step == 0 and self.measure_at_start and self.probe is not None:
            self._decision = (0, True)
            self._measure(trainer, pl_module)
            reporting.announce_plan(self, trainer)
        self._last_step = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer) and self.cadence.points:
            reporting.report_run(self)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if not self._active(trainer) or self.probe is None or step == self._last_step:
            return  # no optimizer step happened (gradient accumulation) or nothing to do
        self._last_step = step
        if self.is_due(trainer, step):
            self._measure(trainer, pl_module)

    # -- measuring ---------------------------------------------------------------------------
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.failures.disabled or self.probe is None:
            return
        device = pl_module.device
        sync(device)
        start = time.perf_counter()
        ctx = MeasureContext(self, trainer, pl_module)
        metrics, error = ctx.run()
        decision = collective_decision(trainer, device, error)
        if decision.failed and decision.out_of_memory and max(self.probe.sizes) > 1:
            # free what the failed try held, then once more with half-size probe batches
            del ctx
            metrics = error = None
            free_memory(device)
            self.probe = halved_probe(self.probe)
            shared_state(trainer).probes[self.probe_key] = self.probe
            self.warn_once(
                f"{self._owner_name()}: a measurement ran out of memory; probe batches are "
                f"halved to {max(self.probe.sizes)} samples for the rest of the run."
            )
            ctx = MeasureContext(self, trainer, pl_module)
            metrics, error = ctx.run()
            decision = collective_decision(trainer, device, error)
        if decision.failed or metrics is None:
            self.failures.failed(
                decision, error, announce=error is not None or trainer.is_global_zero
            )
            metrics = {"skipped": float(self.failures.skipped)}
            if error is not None and decision.out_of_memory:
                free_memory(device)
        else:
            self.failures.succeeded()
        sync(device)
        wall = time.perf_counter() - start
        shared_state(trainer).busy += wall
        cost = max(wall + ctx.cost_adjustment, 0.0) + self._capture_seconds
        self._capture_seconds = 0.0
        if not metrics and not self.logs_without_scalars:
            # nothing could be measured yet (e.g. no optimizer state): not a point of the plan;
            # look again soon, backing off (1, 2, 4, … steps) while it stays so
            self.seconds += cost
            self._empty_streak += 1
            self.cadence.next_check = trainer.global_step + 2 ** min(self._empty_streak - 1, 10)
            return
        self._empty_streak = 0
        self.cadence.record(cost)
        if self.cadence.planned:  # rank 0 re-plans from the new cost, every rank follows
            nxt = self.cadence.replan(trainer.global_step)
            self.cadence.next_check = int(trainer.strategy.broadcast(nxt, src=0))
        reporting.check_plan(self)
        self.seconds += cost
        self._log(trainer, pl_module, metrics)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        scalars = {self.tag(k): float(v) for k, v in metrics.items()}
        self.last_metrics = scalars
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        self.on_logged(trainer, pl_module, metrics)

    def on_logged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """Hook for subclasses (progress bar, figures) after scalars were logged."""

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "cadence": self.cadence.state_dict(),
            "skipped": self.skipped,
            "seconds": self.seconds,
            "vectors": {k: v.detach().cpu() for k, v in self.vectors.items()},
            "auto_size": self.auto_size,
        }
        # the shared solve's warm start goes into the checkpoint once: with its owner
        ref = getattr(self, "_trainer", None)
        trainer = ref() if ref is not None else None
        if trainer is not None and self._owns_warm_start(trainer):
            warm = shared_state(trainer).warm.get(self.solve_key)
            if warm is not None:
                state["shared_warm"] = {"solve": warm.detach().cpu()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cadence.load_state_dict(state_dict.get("cadence", {}))
        self.failures.skipped = int(state_dict.get("skipped", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.vectors = dict(state_dict.get("vectors", {}))
        self._shared_warm = state_dict.get("shared_warm")
        size = state_dict.get("auto_size")
        self.auto_size = None if size is None else int(size)
