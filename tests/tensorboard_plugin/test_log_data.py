"""``panels.log_data``: a JSON text summary on the trainer's TensorBoard run (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import panels


def test_log_data_writes_the_json_text(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path), logger], is_global_zero=True)
    payload = {"grid": [0.0, 1.0, 2.0], "density": [0.1, 0.5, 0.1]}
    assert panels.log_data(trainer, "landscape/hessian/density_data", payload, 7) is True
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (event,) = events.Tensors("landscape/hessian/density_data/text_summary")
    assert event.step == 7
    assert json.loads(event.tensor_proto.string_val[0]) == payload


def test_log_data_skips_without_a_rank_zero_tensorboard(tmp_path: Path) -> None:
    payload = {"grid": [0.0], "density": [1.0]}
    assert panels.log_data(None, "t", payload, 0) is False
    assert panels.log_data(SimpleNamespace(loggers=[CSVLogger(tmp_path)]), "t", payload, 0) is False
    other_rank = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path)], is_global_zero=False)
    assert panels.log_data(other_rank, "t", payload, 0) is False
    with pytest.raises(TypeError):
        panels.log_data(None, "t", {"grid": object()}, 0)  # checked even when skipping
