"""Quantities read from optimizer state wait until it has settled (``settle_steps``)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_landscape.callbacks import GradientFlowDeviation, Sharpness

from .helpers import Net, RecordingLogger, loader, trainer


def _fit(cbs, optimizer: str = "adam") -> RecordingLogger:
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    trainer(cbs, logger=log, max_steps=14).fit(Net(optimizer=optimizer, lr=1e-2), loader())
    return log


def test_preconditioned_and_ratio_start_after_settle_steps() -> None:
    log = _fit([Sharpness(every_n_steps=2, probe_size=32)])
    assert sorted(log.series("landscape/sharpness/lambda_max")) == list(range(0, 15, 2))
    assert sorted(log.series("landscape/sharpness/threshold")) == list(range(0, 15, 2))
    assert sorted(log.series("landscape/sharpness/preconditioned")) == [10, 12, 14]
    assert sorted(log.series("landscape/sharpness/ratio")) == [10, 12, 14]


def test_unpreconditioned_ratio_is_not_delayed() -> None:
    log = _fit([Sharpness(every_n_steps=2, probe_size=32)], optimizer="sgd")
    assert sorted(log.series("landscape/sharpness/ratio")) == list(range(0, 15, 2))


def test_step_gap_starts_after_settle_steps() -> None:
    log = _fit([GradientFlowDeviation(every_n_steps=2, probe_size=32)])
    assert sorted(log.series("landscape/gradient_flow/step_gap")) == [10, 12, 14]
    log = _fit([GradientFlowDeviation(every_n_steps=2, probe_size=32, settle_steps=3)])
    assert sorted(log.series("landscape/gradient_flow/step_gap")) == [4, 6, 8, 10, 12, 14]


@pytest.mark.parametrize("cls", [Sharpness, GradientFlowDeviation])
def test_bad_settle_steps(cls) -> None:
    with pytest.raises(ValueError, match="`settle_steps`.*-1"):
        cls(settle_steps=-1)
