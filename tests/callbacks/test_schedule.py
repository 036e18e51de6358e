"""The schedule object (due parts per event and step), the run's once-per-step decision with
one collective, the shared options object and the ``Pausable`` protocol."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_landscape.callbacks import (
    KFAC,
    GradientFlowDeviation,
    HessianEigenvalues,
    LossLandscape,
    MeasurementCallback,
    Pausable,
    ProbeOptions,
    SampleVarianceDecay,
    Sharpness,
)
from lightning_landscape.callbacks import shared as shared_module
from lightning_landscape.callbacks.cadence import Cadence
from lightning_landscape.callbacks.schedule import (
    AtEnd,
    AtSteps,
    Budgeted,
    EveryNEpochs,
    Schedule,
    Windows,
    decide,
)

from .helpers import Net, RecordingLogger, loader, trainer

MEASUREMENTS = (Sharpness, HessianEigenvalues, GradientFlowDeviation, SampleVarianceDecay)


def _due_steps(schedule: Schedule, steps: range) -> dict[int, frozenset[str]]:
    return {s: d for s in steps if (d := schedule.local("step", s))}


def test_every_n_steps_and_step_zero_at_start() -> None:
    cadence = Cadence(every_n_steps=5)
    s = Schedule({"measure": [Budgeted(cadence)]}, cadence)
    assert s.local("start", 0) == {"measure"}
    assert s.local("start", 7) == frozenset()  # a resumed run: no step-0 measurement
    assert sorted(_due_steps(s, range(1, 21))) == [5, 10, 15, 20]
    assert s.local("epoch_end", 5) == frozenset() and s.local("end", 20) == frozenset()
    off = Schedule({"measure": [Budgeted(cadence, at_start=False)]}, cadence)
    assert off.local("start", 0) == frozenset()


def test_a_schedule_callable() -> None:
    cadence = Cadence(schedule=lambda step: step in (3, 4, 9))
    s = Schedule({"measure": [Budgeted(cadence)]}, cadence)
    assert sorted(_due_steps(s, range(1, 12))) == [3, 4, 9]


def test_steps_epochs_end_at_most_once_per_step() -> None:
    triggers = [AtSteps([6, 0, 3, 3]), EveryNEpochs(2), AtEnd()]
    s = Schedule({"surface": triggers}, Cadence(every_n_steps=1), once_per_step=True)
    assert s.local("start", 0) == {"surface"}
    assert s.local("step", 0) == frozenset()  # step 0 was measured at the start
    assert s.local("step", 3) == {"surface"} and s.local("step", 4) == frozenset()
    assert s.local("epoch_end", 4, epoch=0) == frozenset()
    assert s.local("epoch_end", 4, epoch=1) == {"surface"}
    assert s.local("step", 6) == {"surface"}
    assert s.local("end", 6) == frozenset()  # the end coincides with a measured step
    assert s.local("end", 8) == {"surface"}
    restored = Schedule({"surface": triggers}, Cadence(every_n_steps=1), once_per_step=True)
    restored.load_state_dict(s.state_dict())
    assert restored.measured_step == 8 and restored.local("end", 8) == frozenset()


def test_windows_end_length_steps_after_they_open() -> None:
    cadence = Cadence(every_n_steps=10)
    windows = Windows(length=3, every=8)
    s = Schedule({"gap": [Budgeted(cadence)], "window_end": [windows]}, cadence)
    assert windows.starts_at(8) and not windows.starts_at(9)
    assert _due_steps(s, range(1, 12)) == {10: {"gap"}}  # no window open: none ends
    windows.open(8)
    windows.times += [0.1, 0.1]
    assert _due_steps(s, range(9, 12)) == {10: {"gap"}, 11: {"window_end"}}
    assert s.local("start", 11) == frozenset()  # a window ends at a step, never at the start
    state = s.state_dict()
    assert state == {"window": {"start": 8, "times": [0.1, 0.1]}}
    windows.close()
    assert not windows.is_open and s.state_dict() == {"window": None}
    s.load_state_dict(state)
    assert windows.start == 8 and windows.times == [0.1, 0.1]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Strategy:
    def __init__(self) -> None:
        self.broadcasts: list[Any] = []

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.broadcasts.append(obj)
        return obj


class _Peer:
    def __init__(self, timing: Schedule) -> None:
        self.timing = timing
        self.cadence = timing.cadence
        self._warned: set[str] = set()


def test_budget_decisions_of_all_peers_travel_in_one_broadcast() -> None:
    clock = _Clock()
    budgets = [Cadence(max_overhead=0.1, clock=clock) for _ in range(2)]
    peers = [_Peer(Schedule({"measure": [Budgeted(c)]}, c)) for c in budgets]
    every = Cadence(every_n_steps=2)
    peers.append(_Peer(Schedule({"measure": [Budgeted(every)]}, every)))
    strategy = _Strategy()
    fake = SimpleNamespace(global_step=0, current_epoch=0, strategy=strategy)
    for c in budgets:
        c.start(0)
    # the first budget measured for 1 s at step 0; the second has not measured yet
    budgets[0].record(1.0)
    clock.now = 1.0
    fake.global_step = 1
    due = decide(fake, peers, "step", busy=1.0)  # type: ignore[arg-type]
    assert [due[id(p)] for p in peers] == [frozenset(), {"measure"}, frozenset()]
    assert len(strategy.broadcasts) == 1 and len(strategy.broadcasts[0]) == 2
    nxt = budgets[0].next_check
    assert nxt > 1  # the 1 s measurement is paid back by waiting (0.1 s per step: 1 - 0.1 ...)
    # between checks: no collective at all, whatever the other cadences say
    clock.now, fake.global_step = 1.1, 2
    budgets[1].next_check = nxt
    due = decide(fake, peers, "step", busy=1.0)  # type: ignore[arg-type]
    assert len(strategy.broadcasts) == 1 and due[id(peers[2])] == {"measure"}
    assert not due[id(peers[0])] and not due[id(peers[1])]


def test_the_run_decides_once_per_step_before_any_callback_measures(monkeypatch) -> None:
    calls: list[tuple[str, int, int]] = []
    real = shared_module.decide

    def counted(trainer: pl.Trainer, peers: Any, event: Any, busy: float) -> Any:
        calls.append((event, trainer.global_step, len(peers)))
        return real(trainer, peers, event, busy)

    monkeypatch.setattr(shared_module, "decide", counted)
    solves: list[int] = []
    real_top_k = shared_module.Shared.top_k

    def top_k(self: Any, key: Any, step: int, operator: Any, requests: Any, seed: int) -> Any:
        solve, computed = real_top_k(self, key, step, operator, requests, seed)
        if computed:
            solves.append(step)
        return solve, computed

    monkeypatch.setattr(shared_module.Shared, "top_k", top_k)
    cbs = [Sharpness(every_n_steps=4, probe_size=32), HessianEigenvalues(every_n_steps=4, k=2,
           probe_size=32)]  # fmt: skip
    pl.seed_everything(0, verbose=False)
    log = RecordingLogger()
    trainer(cbs, logger=log, max_steps=8).fit(Net(), loader())
    assert calls[0] == ("start", 0, 2)
    assert [s for e, s, _ in calls if e == "step"] == list(range(1, 9))
    assert solves == [0, 4, 8]  # one shared solve per measured step, for both callbacks
    assert sorted(log.series("landscape/hessian/eig_1")) == [0, 4, 8]
    assert log.series("landscape/sharpness/lambda_max") == log.series("landscape/hessian/eig_1")


@pytest.mark.parametrize("cls", [*MEASUREMENTS, LossLandscape])
def test_flat_signatures_for_the_cli_and_one_options_object(cls: type) -> None:
    params = inspect.signature(cls).parameters
    for name in ("probe_size", "probe_batch_size", "probe_dataloader", "bn", "seed", "name"):
        p = params[name]
        assert p.kind is p.KEYWORD_ONLY and p.annotation is not p.empty
        assert p.default is not p.empty
    cb = cls(probe_batch_size=7, seed=3, name="x")
    assert isinstance(cb.options, ProbeOptions)
    assert (cb.options.probe_batch_size, cb.probe_batch_size, cb.seed, cb.name) == (7, 7, 3, "x")
    assert cb.options.bn == params["bn"].default
    if cls is not LossLandscape:
        assert cls(every_n_steps=5).cadence.every_n_steps == 5
    with pytest.raises(ValueError, match="`probe_batch_size` must be a positive integer, got 0"):
        cls(probe_batch_size=0)


def test_options_pick_ignores_what_is_not_an_option() -> None:
    opts = ProbeOptions.pick({"self": object(), "k": 3, "seed": 2, "bn": "batch"})
    assert (opts.seed, opts.bn, opts.every_n_steps) == (2, "batch", None)
    with pytest.raises(TypeError, match="not both"):
        MeasurementCallback(opts, seed=1)


class _Recorder(Callback):
    """Pausable by declaring ``paused``: counts the measurements it was paused for."""

    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.entered += 1
        yield


class _NotPausable(Callback):
    paused_for = 0


def test_pausable_protocol() -> None:
    assert isinstance(KFAC(), Pausable) and issubclass(KFAC, Pausable)
    assert isinstance(_Recorder(), Pausable)
    assert not isinstance(_NotPausable(), Pausable)
    assert not isinstance(Sharpness(), Pausable)
    rec = _Recorder()
    pl.seed_everything(0, verbose=False)
    trainer([Sharpness(every_n_steps=3, probe_size=32), rec, _NotPausable()], max_steps=6).fit(
        Net(), loader()
    )
    assert rec.entered >= 3  # steps 0, 3, 6 (and the probe's calibration, if any)
