"""A measurement never ends the fit: exceptions, bad losses, out-of-memory; names; run scope."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.callbacks.failures import FailurePolicy, cause_of
from lightning_landscape.callbacks.shared import shared_state

from .helpers import Net, RecordingLogger, dataset, loader, trainer


def fit(
    callbacks: list[Any],
    model: pl.LightningModule | None = None,
    train: DataLoader | None = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
):
    pl.seed_everything(0, verbose=False)
    model = model or Net()
    log = kwargs.pop("logger", RecordingLogger())
    t = trainer(callbacks, logger=log, **kwargs)
    t.fit(model, train if train is not None else loader(), ckpt_path=ckpt_path)
    return model, t, log


def exact_resume_fit(callbacks: list[Any], **kwargs: Any):
    """No dropout, no shuffling, checkpoints at epoch ends (64 / 16): training resumes exactly."""
    pl.seed_everything(0, verbose=False)
    return fit(callbacks, model=Net(dropout=0.0), train=loader(64, shuffle=False), **kwargs)


class Flaky(Sharpness):
    """Raises ``error`` at the measured steps listed in ``fail_at``."""

    def __init__(self, error: Exception, fail_at: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error
        self.fail_at = fail_at
        self.attempts: list[int] = []

    def measure(self, ctx, due):  # type: ignore[no-untyped-def]
        self.attempts.append(ctx.step)
        if ctx.step in self.fail_at:
            raise self.error
        return super().measure(ctx, due)


def _landscape_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if "landscape/" in str(w.message) or "measur" in str(w.message)
    ]


def test_exception_is_a_skip_warned_once_and_training_goes_on() -> None:
    cb = Flaky(RuntimeError("boom at step 4"), {4, 8}, every_n_steps=2, probe_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t, log = fit([cb], max_steps=12)
    assert t.global_step == 12
    skipped = log.series("landscape/sharpness/skipped")
    assert skipped == {4: 1.0, 8: 2.0}
    measured = log.series("landscape/sharpness/lambda_max")
    assert sorted(measured) == [0, 2, 6, 10, 12]
    msgs = [m for m in _landscape_warnings(caught) if "skipped a measurement" in m]
    # the two failures differ only in numbers: one cause, one warning, no step number in it
    assert len(msgs) == 1, msgs
    assert "RuntimeError: boom at step 4" in msgs[0] and "landscape/sharpness/skipped" in msgs[0]
    assert not cb.disabled


def test_repeated_failures_stop_measuring_once() -> None:
    cb = Flaky(ValueError("broken"), set(range(2, 100)), every_n_steps=2, probe_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t, log = fit([cb], max_steps=14)
    assert t.global_step == 14
    assert cb.disabled and cb.attempts == [0, 2, 4, 6]  # 3 in a row, then no more tries
    assert log.series("landscape/sharpness/skipped") == {2: 1.0, 4: 2.0, 6: 3.0}
    stops = [m for m in _landscape_warnings(caught) if "stops measuring" in m]
    assert len(stops) == 1 and "ValueError: broken" in stops[0]


def test_strict_reraises() -> None:
    cb = Flaky(RuntimeError("boom"), {2}, every_n_steps=2, probe_size=32, strict=True)
    with pytest.raises(RuntimeError, match="boom"):
        fit([cb], max_steps=6)


class ReturnsNothing(Net):
    """A training_step whose output a measurement cannot use (in eval mode, i.e. measuring)."""

    def __init__(self, what: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if self.training:
            return loss
        if self.what == "none":
            return None
        if self.what == "dict":
            return {"logits": loss}
        return loss.expand(3)  # not a scalar


@pytest.mark.parametrize("what", ["none", "dict", "vector"])
def test_unusable_training_step_output_is_a_skip_with_the_fix(what: str) -> None:
    cb = Sharpness(every_n_steps=2, probe_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t, log = fit([cb], model=ReturnsNothing(what), max_steps=4)
    assert t.global_step == 4
    msgs = [m for m in _landscape_warnings(caught) if "skipped a measurement" in m]
    assert len(msgs) == 1 and "landscape_loss" in msgs[0], msgs
    assert "LossExtractionError" in msgs[0]
    assert log.series("landscape/sharpness/skipped") == {0: 1.0, 2: 2.0, 4: 3.0}


def test_landscape_loss_is_used_when_defined() -> None:
    class Custom(ReturnsNothing):
        def landscape_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    cb = Sharpness(every_n_steps=2, probe_size=32)
    _, _, log = fit([cb], model=Custom("none"), max_steps=8)
    assert cb.skipped == 0 and len(log.series("landscape/sharpness/lambda_max")) >= 3


class OutOfMemoryOnce(Sharpness):
    """Raises ``torch.OutOfMemoryError`` when the probe batches hold more than ``limit``."""

    def __init__(self, limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def measure(self, ctx, due):  # type: ignore[no-untyped-def]
        if max(ctx.probe.sizes) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().measure(ctx, due)


def test_out_of_memory_retries_with_half_batches() -> None:
    cb = OutOfMemoryOnce(limit=8, every_n_steps=4, probe_size=32, probe_batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, log = fit([cb], max_steps=8)
    assert cb.skipped == 0
    assert sorted(log.series("landscape/sharpness/lambda_max")) == [0, 4, 8]
    assert any("halved to 8 samples" in m for m in _landscape_warnings(caught))


def test_out_of_memory_twice_is_a_skip() -> None:
    cb = OutOfMemoryOnce(limit=2, every_n_steps=4, probe_size=32, probe_batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t, log = fit([cb], max_steps=8)
    assert t.global_step == 8
    # 16 -> 8 at step 0 (still too big: a skip); 8 -> 4 at step 4; 4 -> 2 at step 8: measured
    assert log.series("landscape/sharpness/skipped") == {0: 1.0, 4: 2.0}
    assert sorted(log.series("landscape/sharpness/lambda_max")) == [8]
    assert any("lower `probe_batch_size`" in m for m in _landscape_warnings(caught))


def test_two_named_instances_side_by_side_and_resume(tmp_path) -> None:
    heldout = DataLoader(dataset(48, seed=7), batch_size=16)

    def make() -> list[Sharpness]:
        return [
            Sharpness(every_n_steps=2, probe_size=32),
            Sharpness(every_n_steps=2, probe_size=32, name="heldout", probe_dataloader=heldout),
        ]

    full_cbs = make()
    _, _, full = exact_resume_fit(full_cbs, max_steps=8)
    a, b = (
        full.series("landscape/sharpness/lambda_max"),
        full.series("landscape/heldout/lambda_max"),
    )
    assert sorted(a) == sorted(b) == [0, 2, 4, 6, 8]
    assert a != b  # two probes, two values
    assert full_cbs[0].state_key != full_cbs[1].state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _, _, first = exact_resume_fit([*make(), ckpt], max_steps=4, enable_checkpointing=True)
    path = next(tmp_path.glob("*step=4*.ckpt"))
    _, _, resumed = exact_resume_fit(make(), max_steps=8, ckpt_path=str(path))
    for tag in ("landscape/sharpness/lambda_max", "landscape/heldout/lambda_max"):
        got = {**first.series(tag), **resumed.series(tag)}
        want = full.series(tag)
        assert got.keys() == want.keys()
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-5), (tag, s)


def test_bad_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="`name`.*'has space'"):
        Sharpness(name="has space")


def test_shared_state_is_per_fit() -> None:
    cb = Sharpness(every_n_steps=4, probe_size=32)
    model = Net()
    t = trainer([cb], max_steps=4)
    t.fit(model, loader())
    first = cb.probe
    assert first is not None and shared_state(t).probes == {}  # the run was closed
    t2 = trainer([cb], max_steps=4)
    seen: list[Any] = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, *args: Any) -> None:  # type: ignore[no-untyped-def]
            seen.append(cb.probe.batches[0][0].clone())

    t2.callbacks.append(Peek())
    t2.fit(model, DataLoader(dataset(48, seed=9), batch_size=16))
    # the probe of the second fit comes from its own loader, not the first fit's
    assert torch.equal(seen[0], dataset(48, seed=9).tensors[0][:32])
    assert cb.probe is not first and shared_state(t2).probes == {}


def test_shared_warm_start_is_checkpointed_once_and_resume_reproduces_top_k(tmp_path) -> None:
    def make() -> list[Any]:
        return [
            Sharpness(every_n_steps=2, probe_size=32, max_iter=4, tol=1e-12),
            HessianEigenvalues(k=3, every_n_steps=4, probe_size=32, max_iter=6, tol=1e-12),
        ]

    _, _, full = exact_resume_fit(make(), max_steps=8)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _, _, first = exact_resume_fit([*make(), ckpt], max_steps=4, enable_checkpointing=True)
    path = next(tmp_path.glob("*step=4*.ckpt"))
    states = torch.load(path, weights_only=False)["callbacks"]
    with_warm = [k for k, v in states.items() if "shared_warm" in v]
    assert len(with_warm) == 1 and "Sharpness" in with_warm[0]
    _, _, resumed = exact_resume_fit(make(), max_steps=8, ckpt_path=str(path))
    for tag in [f"landscape/hessian/eig_{i}" for i in (1, 2, 3)]:
        got = {**first.series(tag), **resumed.series(tag)}
        want = full.series(tag)
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-9), (tag, s)


def test_failure_policy_cause_ignores_numbers() -> None:
    a = cause_of(RuntimeError("tried to allocate 2.5 GiB at step 10"))
    b = cause_of(RuntimeError("tried to allocate 7 GiB at step 12"))
    assert a == b == "RuntimeError: tried to allocate N GiB at step N"
    policy = FailurePolicy("X", "landscape/x/skipped", limit=2)
    assert policy.skipped == 0 and not policy.disabled
