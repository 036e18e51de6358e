"""Logs of a short real run for the browser test: the zoo's digits MLP, two runs.

``digits/sgd``: SGD + momentum (lr 0.3, at the edge of stability by step ~24) with Sharpness, HessianEigenvalues (density), SampleVarianceDecay,
GradientFlowDeviation (with windows) and LossLandscape (2-D grid at the end);
``digits/kfac``: K-FAC over SGD with Sharpness (kl_scale, damping, preconditioned sharpness).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

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
    """Train both runs into ``root`` (a few seconds on one CPU thread); returns ``root``.

    ``HessianEigenvalues`` logs its density as data (``density_data``) itself."""
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
