"""The shared Lightning shell of every measurement: cadence, probe, guard, failure, logging.

A subclass implements :meth:`MeasurementCallback.measure` — a pure computation on a
:class:`MeasureContext` returning ``{quantity: value}`` — and :meth:`charts`. The base class:

- captures the probe at ``on_train_start`` (after the sanity check; each rank its own shard of
  ``probe_size / world_size`` samples, without consuming the training RNG) and measures once at
  step 0 before the first optimizer step;
- then measures in ``on_train_batch_end`` after the optimizer step (and at epoch or training
  end where its schedule says so), calling ``measure(ctx, due)`` with the parts its
  :class:`~lightning_landscape.callbacks.schedule.Schedule` makes due: by default one part on the
  :class:`~lightning_landscape.callbacks.cadence.Cadence` (``every_n_steps``, ``schedule`` or the
  default wall-time budget ``max_overhead``). The due parts of all callbacks of a run are decided
  once per step, before any measures, with one collective at budget checks;
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

The run-scoped state the callbacks of one fit share (probes, solves, warm starts, the due
decision) is created in ``setup`` and dropped in ``teardown`` (:mod:`.shared`).
"""

from __future__ import annotations

import functools
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
from lightning_landscape.callbacks.context import MeasureContext, Pausable
from lightning_landscape.callbacks.failures import (
    FailurePolicy,
    collective_decision,
    free_memory,
    halved_probe,
)
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.run_info import run_length, sync
from lightning_landscape.callbacks.schedule import Budgeted, Event, Schedule, account
from lightning_landscape.callbacks.shared import (
    SolveRequest,
    close_run,
    open_run,
    shared_state,
)
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.probe import Probe
from lightning_landscape.metrics import Metric

__all__ = ["MeasureContext", "MeasurementCallback", "Pausable", "ProbeOptions", "Schedule"]


class MeasurementCallback(Callback):
    """Base class of the measurement callbacks (see the module docstring). A subclass declares its options as flat keyword arguments, hands the shared ones over as
    ``super().__init__(ProbeOptions.pick(locals()))`` (or passes them flat), and implements
    :meth:`measure`. Its :class:`~lightning_landscape.callbacks.schedule.Schedule` defaults to
    one part, ``"measure"``, on the cadence plus step 0; give ``timing`` for another.
    """

    family: ClassVar[str] = ""
    #: A measurement with no scalars still produced something (figures, files): log it as a
    #: point. Otherwise an empty result means "nothing could be measured yet".
    logs_without_scalars: ClassVar[bool] = False
    #: What this callback logs (see :mod:`lightning_landscape.metrics`); its charts follow.
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def __init__(
        self,
        options: ProbeOptions | None = None,
        /,
        *,
        timing: Callable[[Cadence], Schedule] | None = None,
        **flat: Any,
    ) -> None:
        if options is None:
            options = ProbeOptions(**flat)
        elif flat:
            raise TypeError(f"give `options` or keyword arguments, not both (got {sorted(flat)})")
        self.options = options
        self.cadence = options.cadence()
        #: which parts are due at each event (see :mod:`~lightning_landscape.callbacks.schedule`)
        self.timing: Schedule = (
            timing(self.cadence)
            if timing is not None
            else Schedule({"measure": [Budgeted(self.cadence)]}, self.cadence)
        )
        self.probe_size: int | Literal["auto"] = options.probe_size
        #: the global size chosen for ``probe_size="auto"`` (``None`` until chosen)
        self.auto_size: int | None = None
        #: what the cadence planned at the first measurement, and what the run measured
        self.plan_summary: dict[str, Any] = {}
        self.run_summary: dict[str, Any] = {}
        self._capture_seconds = 0.0
        self._empty_streak = 0
        self.probe_batch_size = options.probe_batch_size
        self.probe_dataloader = options.probe_dataloader
        self.bn: BNMode = options.bn
        self.dropout = options.dropout
        self.seed = options.seed
        self.name: str = options.name if options.name is not None else self.family
        self.strict = options.strict
        self.probe: Probe | None = None
        self.failures = FailurePolicy(self._owner_name(), self.tag("skipped"))
        self.vectors: dict[str, torch.Tensor] = {}
        self.last_metrics: dict[str, float] = {}
        self.seconds = 0.0
        self._last_step = -1
        self._warned: set[str] = set()
        self._shared_warm: dict[str, torch.Tensor] | None = None  # loaded, not yet handed over

    # -- what subclasses provide -----------------------------------------------------------
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        """Compute this callback's quantities at ``ctx.step`` (inside the guard) for the
        ``due`` parts of its schedule (``{"measure"}`` with the default schedule)."""
        raise NotImplementedError

    def advance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: frozenset[str]
    ) -> None:
        """After the measurement (if any) at training start and at every optimizer step: for
        state that follows the steps rather than the measurements (e.g. windows)."""

    def charts(self) -> list[panels.Chart]:
        """The custom-scalars charts this callback contributes to the dashboard (from its
        :attr:`metrics`; a declaration with an ``option`` only when that attribute is set)."""
        return list(panels.family_charts(self.metrics, self))

    def solve_request(self) -> SolveRequest | None:
        """What this callback needs from the shared top-k solve (``None``: nothing)."""
        return None

    def expected_products(self) -> tuple[float, float]:
        """Hessian-vector products (or equivalent passes) of a cold and of a warm measurement
        (they only size an automatic probe before anything was timed)."""
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

    @functools.cached_property
    def state_key(self) -> str:  # in the form of Lightning's own keys; it reads it per hook call
        return f"{type(self).__qualname__}{self.state_key_parts()!r}"

    def state_key_parts(self) -> dict[str, Any]:
        return dict(family=self.family, name=self.name, probe_size=self.probe_size, bn=self.bn)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message, category=UserWarning)

    def _peers(self, trainer: pl.Trainer) -> list[MeasurementCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback)]  # type: ignore[attr-defined]

    def _owns_warm_start(self, trainer: pl.Trainer) -> bool:
        return shared_state(trainer).owners.get(self.solve_key) == id(self)

    # -- schedule ----------------------------------------------------------------------------
    def due_now(self, trainer: pl.Trainer, event: Event) -> frozenset[str]:
        """This callback's due parts at ``event`` of the current step: at ``"start"`` and
        ``"step"`` from the run's decision for all callbacks (:func:`.schedule.decide`, taken
        once per step), at the other events (rule-based, identical on all ranks) its own."""
        if event not in ("start", "step"):
            return self.timing.local(event, trainer.global_step, trainer.current_epoch)
        due = shared_state(trainer).due_at(trainer, self._peers(trainer), event)
        return due.get(id(self), frozenset())

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
        due = self.due_now(trainer, "start")
        if due and self.probe is not None:
            self._measure(trainer, pl_module, due)
            if self.timing.uses_cadence:
                reporting.announce_plan(self, trainer)
        self._last_step = trainer.global_step
        self.advance(trainer, pl_module, frozenset())

    def _measure_at(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: Event) -> None:
        if self._active(trainer) and self.probe is not None:
            due = self.due_now(trainer, event)
            if due:
                self._measure(trainer, pl_module, due)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_at(trainer, pl_module, "epoch_end")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_at(trainer, pl_module, "end")
        if self._active(trainer) and self.timing.uses_cadence and self.cadence.points:
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
        due = self.due_now(trainer, "step")
        if due:
            self._measure(trainer, pl_module, due)
        self.advance(trainer, pl_module, due)

    # -- measuring ---------------------------------------------------------------------------
    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: frozenset[str]
    ) -> None:
        if self.failures.disabled or self.probe is None:
            return
        device = pl_module.device
        sync(device)
        start = time.perf_counter()
        ctx = MeasureContext(self, trainer, pl_module, due)
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
            ctx = MeasureContext(self, trainer, pl_module, due)
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
        # an empty result: nothing could be measured yet (e.g. no optimizer state)
        empty = not metrics and not self.logs_without_scalars
        self.seconds += cost
        account(self, trainer, cost, empty=empty)
        if empty:
            return
        self._log(trainer, pl_module, metrics)

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        scalars = {self.tag(k): float(v) for k, v in metrics.items()}
        if scalars:  # (figures or files only: nothing for the loggers)
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
            **self.timing.state_dict(),
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
        self.timing.load_state_dict(state_dict)
        self.failures.skipped = int(state_dict.get("skipped", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.vectors = dict(state_dict.get("vectors", {}))
        self._shared_warm = state_dict.get("shared_warm")
        size = state_dict.get("auto_size")
        self.auto_size = None if size is None else int(size)
