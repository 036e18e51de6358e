"""Logs of a short real run for the browser test: the zoo's digits MLP, two runs.

``digits/sgd``: SGD + momentum (lr 0.3, at the edge of stability by step ~24) with Sharpness, HessianEigenvalues (density), SampleVarianceDecay,
GradientFlowDeviation (with windows) and LossLandscape (2-D grid at the end);
``digits/kfac``: K-FAC over SGD with Sharpness (kl_scale, damping, preconditioned sharpness).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_landscape import panels
from lightning_landscape.callbacks import (
    KFAC,
    GradientFlowDeviation,
    HessianEigenvalues,
    LossLandscape,
    SampleVarianceDecay,
    Sharpness,
)
from lightning_landscape.zoo import MLP, Classifier, DigitsDataModule

STEPS = 40
PROBE = {"probe_size": 128, "probe_batch_size": 128}


def _density_data_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until ``HessianEigenvalues`` logs ``density_data`` itself: log the density it draws.

    Wraps ``panels.density_figure`` (records grid and density) and ``panels.log_figure`` (on
    a ``.../density`` figure, writes ``.../density_data`` with :func:`panels.log_data`, unless
    the callback already did at that step).
    """
    drawn: dict[str, Any] = {}
    logged: set[tuple[str, int]] = set()
    real_figure, real_log_figure, real_log_data = (
        panels.density_figure, panels.log_figure, panels.log_data,
    )  # fmt: skip

    def density_figure(grid: Any, density: Any, *args: Any, **kwargs: Any) -> Any:
        drawn["payload"] = {
            "grid": np.asarray(grid, dtype=float).tolist(),
            "density": np.asarray(density, dtype=float).tolist(),
        }
        return real_figure(grid, density, *args, **kwargs)

    def log_data(trainer: Any, tag: str, payload: Any, step: int) -> bool:
        logged.add((tag, step))
        return real_log_data(trainer, tag, payload, step)

    def log_figure(trainer: Any, tag: str, figure: Any, step: int) -> bool:
        data_tag = tag + "_data"
        if tag.endswith("/density") and "payload" in drawn and (data_tag, step) not in logged:
            log_data(trainer, data_tag, drawn.pop("payload"), step)
        return real_log_figure(trainer, tag, figure, step)

    monkeypatch.setattr(panels, "density_figure", density_figure)
    monkeypatch.setattr(panels, "log_figure", log_figure)
    monkeypatch.setattr(panels, "log_data", log_data)


def _fit(root: Path, version: str, lr: float, callbacks: list[pl.Callback]) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, depth=3, width=64), lr=lr, momentum=0.9)
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=callbacks, logger=TensorBoardLogger(root, "digits", version),
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=5, accelerator="cpu", devices=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DigitsDataModule(batch_size=32))


def write_real_logs(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Train both runs into ``root`` (a few seconds on one CPU thread); returns ``root``."""
    _density_data_shim(monkeypatch)
    every = {"every_n_steps": 4, **PROBE}
    # lr 0.3: λ_max climbs to the threshold 2(1+β)/η = 12.7 by step ~24 and is thrown back
    _fit(root, "sgd", 0.3, [
        Sharpness(**every),
        HessianEigenvalues(k=3, density_every_n_steps=8, density_steps=20, **every),
        SampleVarianceDecay(**every),
        GradientFlowDeviation(window=2, window_every_n_steps=10, **every),
        LossLandscape(dims=2, resolution=9, interpolation_resolution=9, **PROBE),
    ])  # fmt: skip
    _fit(root, "kfac", 0.05, [KFAC(damping=0.1, factor_update_every=2, inverse_update_every=4),
                        Sharpness(**every)])  # fmt: skip
    return root
