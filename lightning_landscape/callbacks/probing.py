"""Capturing a callback's probe, and sizing it to the budget (``probe_size="auto"``).

:func:`capture` takes the probe from the training loader (or the callback's
``probe_dataloader``): each rank its own shard of ``size / world_size`` samples, without
consuming the training RNG, moved through the module's batch-transfer hooks.

With ``probe_size="auto"`` (the default of the budgeted callbacks) the probe is sized before the
first measurement, so that a useful number of points fits the budget:

1. up to :data:`AUTO_MAX` samples are captured and a *calibration* times two probe gradients
   and two Hessian-vector products on at most two training batches of the probe, and two
   products on a quarter of that (inside the guard, so training sees nothing; its time and the
   capture's are charged to the first measurement);
2. from those per-sample costs, the training batch size (≈ one training step) and the run's
   length, each callback that shares the probe estimates how many points each candidate size
   would give (:func:`~lightning_landscape.callbacks.plan.affordable_points`, with the
   callback's own estimate of products per cold and per warm measurement);
3. the largest candidate for which every budgeted callback gets ``min_points`` is chosen, down
   to a floor of one training batch; below that the floor is used (and the callback warns, with
   the numbers, once its plan is known);
4. the estimates go to each callback's cadence (:func:`expect`): a step time to plan with
   before steps are timed (one probe gradient of a training batch), a warm point's cost (which
   only places the second point) and the per-step cost of Lightning's dispatch of the
   callback's hooks (timed; charged to the budget).

Rank 0's choice is broadcast, so every rank keeps the same global size; it is checkpointed, so
a resumed run measures on the same probe. An explicit ``probe_size`` is honoured exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from torch.utils.data import DistributedSampler

from lightning_landscape.callbacks.context import pauses
from lightning_landscape.callbacks.failures import collective_decision
from lightning_landscape.callbacks.plan import affordable_points, budget_seconds
from lightning_landscape.callbacks.shared import module_loss, shared_state
from lightning_landscape.measures.guard import guard, preserved_rng
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe, cat_batches, index_batch, slice_batch

if TYPE_CHECKING:
    from lightning_landscape.callbacks.base import MeasurementCallback

__all__ = [
    "AUTO_MAX",
    "Calibration",
    "calibrate",
    "capture",
    "choose_size",
    "cut",
    "shared_probe",
    "start_probe",
]

#: The largest automatic probe (global samples).
AUTO_MAX = 1024
#: Callback hooks Lightning calls per training step (batch start/end, zero-grad, before/after
#: backward, before the optimizer step).
HOOKS_PER_STEP = 6
#: Without a known run length, a callback's point should not cost more than its budget share
#: of this many training steps.
UNKNOWN_LENGTH_STEPS = 100


@dataclass(frozen=True)
class Calibration:
    """Seconds per probe sample of one gradient and of one (warm) Hessian-vector product, and
    the fixed seconds of a product whatever its size (Python and kernel-launch overhead: what
    dominates on small models)."""

    gradient: float
    product: float
    cold_product: float
    fixed: float = 0.0

    def product_seconds(self, samples: float, *, cold: bool = False) -> float:
        """Seconds of one product on ``samples`` probe samples of one rank."""
        return self.fixed + (self.cold_product if cold else self.product) * samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_batch_size(trainer: pl.Trainer, fallback: int) -> int:
    """The training loader's batch size (per rank), or ``fallback`` when it has none."""
    size = getattr(trainer.train_dataloader, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else fallback


def capture(
    cb: MeasurementCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, size: int
) -> Probe:
    """This rank's shard of a ``size``-sample probe for ``cb`` (see the module docstring),
    each batch prepared as Lightning prepares a training batch (:func:`prepare_batch`)."""
    world, rank = trainer.world_size, trainer.global_rank
    if size < world:
        raise ValueError(
            f"`probe_size` must be at least the number of processes ({world}), got {size!r}"
        )
    local = size // world + (1 if rank < size % world else 0)
    source = cb.probe_dataloader if cb.probe_dataloader is not None else trainer.train_dataloader
    if source is None:
        raise RuntimeError("no training dataloader to capture the probe from")
    # a user's probe loader that is not sharded: every rank reads the same samples, so take
    # the first `size` and keep this rank's stride of them (union = those samples)
    unsharded = (
        world > 1
        and cb.probe_dataloader is not None
        and not isinstance(getattr(source, "sampler", None), DistributedSampler)
    )
    with preserved_rng():
        probe = Probe.capture(
            source,
            size=size if unsharded else local,
            batch_size=size if unsharded else cb.probe_batch_size,
            device=pl_module.device,
        )
        if unsharded:
            mine = slice_batch(probe.batches[0], 0, probe.num_samples)
            index = torch.arange(rank, probe.num_samples, world, device=pl_module.device)
            probe = Probe.from_samples(index_batch(mine, index), batch_size=cb.probe_batch_size)
        probe.batches = [prepare_batch(trainer, pl_module, b) for b in probe.batches]
    return probe


def prepare_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """What Lightning does to a training batch before ``training_step``, through public hooks:
    the module's batch-transfer hooks, then the precision plugin's input conversion (so a
    ``"64-true"`` or ``"bf16-true"`` model gets inputs of its own dtype)."""
    batch = pl_module.on_before_batch_transfer(batch, 0)
    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
    batch = pl_module.on_after_batch_transfer(batch, 0)
    return trainer.precision_plugin.convert_input(batch)


def cut(probe: Probe, size: int, world: int, rank: int, batch_size: int) -> Probe:
    """This rank's shard of the first ``size`` global samples of ``probe``."""
    local = size // world + (1 if rank < size % world else 0)
    if local >= probe.num_samples:
        return probe
    samples = slice_batch(cat_batches(probe.batches), 0, local)
    return Probe.from_samples(samples, batch_size=batch_size)


def calibrate(
    cb: MeasurementCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe
) -> Calibration:
    """Time a probe gradient and products on the probe's first batch (at most two training
    batches of it: the calibration is paid from the budget) and on a quarter of that (in the
    guard), and fit ``seconds = fixed + per_sample · samples`` to the products."""
    n = min(probe.sizes[0], max(2 * train_batch_size(trainer, cb.probe_batch_size), 16))
    small = max(1, n // 4)
    device = pl_module.device

    def timed(op: ProbeHessian, v: torch.Tensor) -> tuple[float, float, float]:
        times = []
        grad = op.loss_and_gradient
        for work in (grad, lambda: op.matvec(v), lambda: op.matvec(v), grad):
            _sync(device)
            start = time.perf_counter()
            work()
            _sync(device)
            times.append(time.perf_counter() - start)
        op.release()
        # the second gradient: the first pays one-off costs (it sets the prior step time)
        return min(times[0], times[3]), times[1], times[2]

    with guard(pl_module, bn=cb.bn, dropout=cb.dropout, seed=cb.seed, pauses=pauses(trainer, cb)):
        loss = module_loss(pl_module)
        first = probe.batches[0]
        if n < probe.sizes[0]:
            first = slice_batch(first, 0, n)
        big = ProbeHessian(pl_module, Probe([first], [n]), loss)
        v = torch.randn(big.size, device=big.device, dtype=big.dtype)
        grad, cold, warm = timed(big, v)
        if small < n:
            part = Probe([slice_batch(first, 0, small)], [small])
            _, _, warm_small = timed(ProbeHessian(pl_module, part, loss), v)
        else:
            warm_small = warm
    per_sample = max(warm - warm_small, 0.0) / (n - small) if small < n else warm / n
    fixed = max(warm - per_sample * n, 0.0)
    return Calibration(
        gradient=grad / n,
        product=per_sample,
        cold_product=max(cold - fixed, 0.0) / n,
        fixed=fixed,
    )


def _points(
    cb: MeasurementCallback, size: int, world: int, calib: Calibration, step_time: float
) -> float:
    """Points ``cb`` would get with a ``size``-sample probe (``inf`` without a budget)."""
    cadence = cb.cadence
    if not cadence.budgeted:
        return math.inf
    assert cadence.max_overhead is not None
    cold, warm = cb.expected_products()
    local = size / world
    first = cold * calib.product_seconds(local, cold=True)
    steady = warm * calib.product_seconds(local)
    if cadence.total_steps is None:  # no run length: a point per UNKNOWN_LENGTH_STEPS steps
        budget = budget_seconds(cadence.max_overhead, UNKNOWN_LENGTH_STEPS, step_time)
        return math.inf if steady <= budget else 0.0
    return affordable_points(
        cadence.max_overhead,
        total_steps=cadence.total_steps,
        step_time=step_time,
        first_cost=first,
        warm_cost=steady,
    )


def choose_size(
    peers: list[MeasurementCallback],
    trainer: pl.Trainer,
    calib: Calibration,
    available: int,
    batch_size: int,
) -> int:
    """The global probe size for ``peers`` (callbacks sharing one automatic probe)."""
    world = trainer.world_size
    step_time = calib.gradient * batch_size  # ≈ one training step of this rank
    floor = min(available, max(world, batch_size * world))
    size = min(AUTO_MAX, available)
    while size > floor:
        if all(_points(cb, size, world, calib, step_time) >= cb.cadence.min_points for cb in peers):
            return size
        size = max(floor, size // 2)
    return floor


def dispatch_seconds(trainer: pl.Trainer, cb: MeasurementCallback, repeats: int = 100) -> float:
    """Seconds per training step Lightning spends calling ``cb``'s hooks, measuring or not:
    what it does per callback and hook (look-up, profiler context named by ``state_key``, the
    call), timed on the base class's no-op, times the :data:`HOOKS_PER_STEP` hooks of a step
    (a low estimate: the hooks' own fast paths are not in it)."""
    profiler = getattr(trainer, "profiler", None)
    if not isinstance(profiler, PassThroughProfiler):  # time nothing into the user's profile
        profiler = PassThroughProfiler()
    hook, module = "on_before_zero_grad", trainer.lightning_module
    start = time.perf_counter()
    for _ in range(repeats):
        fn = getattr(cb, hook)
        if callable(fn):
            with profiler.profile(f"[Callback]{cb.state_key}.{hook}"):
                Callback.on_before_zero_grad(cb, trainer, module, None)  # type: ignore[arg-type]
    return HOOKS_PER_STEP * (time.perf_counter() - start) / repeats


def expect(
    peers: list[MeasurementCallback],
    trainer: pl.Trainer,
    calib: Calibration,
    size: int,
    batch_size: int,
) -> None:
    """Hand the calibration's estimates to the peers' cadences: a (low) step time to plan with
    until steps are timed, a warm point's cost to place the second point, and the per-step cost
    of Lightning's dispatch (charged to the budget)."""
    local = size / trainer.world_size
    for cb in peers:
        _, warm = cb.expected_products()
        cb.cadence.prior_step_time = calib.gradient * batch_size
        cb.cadence.prior_warm_cost = warm * calib.product_seconds(local)
        cb.cadence.per_step_cost = dispatch_seconds(trainer, cb)


def auto_size(
    cb: MeasurementCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe
) -> int:
    """Choose (rank 0) and broadcast the global size of ``cb``'s automatic probe."""
    shared = shared_state(trainer)
    key: Any = cb.probe_key
    if key in shared.auto_sizes:
        return shared.auto_sizes[key]
    peers = [p for p in cb._peers(trainer) if p.probe_key == key]
    known = [p.auto_size for p in peers if p.auto_size is not None]
    if known:  # resumed: the checkpointed choice
        size = known[0]
    else:
        calib = calibrate(cb, trainer, pl_module, probe)
        # the global number of samples on offer (a short loader may hold fewer than AUTO_MAX)
        count = torch.tensor(float(probe.num_samples), dtype=torch.float64)
        available = int(trainer.strategy.reduce(count.to(pl_module.device), reduce_op="sum"))
        size = choose_size(
            peers, trainer, calib, available, train_batch_size(trainer, cb.probe_batch_size)
        )
        size = int(trainer.strategy.broadcast(size, src=0))
        expect(peers, trainer, calib, size, train_batch_size(trainer, cb.probe_batch_size))
    shared.auto_sizes[key] = size
    for p in peers:
        p.auto_size = size
    return size


def start_probe(
    cb: MeasurementCallback, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Probe | None:
    """``cb``'s probe for this fit; a failure (not a bad argument) disables ``cb``, collectively."""
    probe, error = None, None
    try:
        probe = shared_probe(cb, trainer, pl_module)
    except ValueError:
        raise  # a bad argument (probe_size < world size): the user's to fix
    except Exception as err:
        if cb.strict:
            raise
        error = err
    decision = collective_decision(trainer, pl_module.device, error)
    if decision.failed:
        cb.failures.disabled = True
        if error is not None or trainer.is_global_zero:
            warnings.warn(
                f"{cb._owner_name()}: could not capture the probe "
                f"({type(error).__name__ if error else 'on another process'}: {error or ''}); "
                "it measures nothing in this run. Training goes on.",
                UserWarning,
                stacklevel=2,
            )
        return None
    return probe


def shared_probe(
    cb: MeasurementCallback, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Probe:
    """The run's probe for ``cb``'s probe options, captured (and sized) on first use; the
    capture time is charged to ``cb``'s first measurement and is not training time."""
    shared = shared_state(trainer)
    if cb.probe_key in shared.probes:
        return shared.probes[cb.probe_key]
    start = time.perf_counter()
    if cb.probe_size == "auto":
        full = capture(cb, trainer, pl_module, AUTO_MAX)
        size = auto_size(cb, trainer, pl_module, full)
        probe = cut(full, size, trainer.world_size, trainer.global_rank, cb.probe_batch_size)
    else:
        probe = capture(cb, trainer, pl_module, cb.probe_size)
    shared.probes[cb.probe_key] = probe
    cb._capture_seconds = time.perf_counter() - start
    shared.busy += cb._capture_seconds
    return probe
