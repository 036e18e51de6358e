"""Every callback of the suite on one Trainer: no observer effect, one dashboard, all tags.

The per-callback files test each measurement against its reference; this file checks that they
compose: attached together (measurements at the same steps, sharing probes and solves) they
still leave training bit-identical — also when K-FAC drives the optimizer, whose statistics the
measurements' forwards must not touch (``GradientFlowDeviation`` then says once that it has no
flow for K-FAC's non-diagonal preconditioner) — and the "Landscape" layout holds every
measurement family's charts, whose regexes match the tags actually logged (K-FAC's own charts:
``test_kfac_callback.py``).
"""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_landscape.callbacks import (
    KFAC,
    GradientFlowDeviation,
    HessianEigenvalues,
    LossLandscape,
    SampleVarianceDecay,
    Sharpness,
)

from .helpers import Net, loader, trainer

PROBE = {"probe_size": 40, "probe_batch_size": 16}


def measurements() -> list[pl.Callback]:
    return [
        Sharpness(every_n_steps=3, **PROBE),
        HessianEigenvalues(k=2, every_n_steps=3, trace=True, trace_matvecs=6, **PROBE),
        GradientFlowDeviation(every_n_steps=3, window=2, window_every_n_steps=4, **PROBE),
        SampleVarianceDecay(every_n_steps=3, **PROBE),
        LossLandscape(at_steps=[5], dims=1, resolution=5, interpolation_resolution=5, **PROBE),
    ]


def fit(callbacks: list[pl.Callback], logger=None, **kwargs) -> tuple[Net, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = Net()
    t = trainer(callbacks, logger=logger, **kwargs)
    t.fit(model, loader())
    return model, t


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("with_kfac", [False, True], ids=["sgd", "kfac+sgd"])
def test_all_measurements_together_leave_training_bit_identical(with_kfac: bool, tmp_path) -> None:
    def kfac() -> list[pl.Callback]:
        return [KFAC(factor_update_every=2, inverse_update_every=4)] if with_kfac else []

    ref, _ = fit(kfac(), default_root_dir=tmp_path)
    cbs = measurements()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = fit([*kfac(), *cbs], default_root_dir=tmp_path)  # LossLandscape's .npz
    unsupported = [w for w in caught if "not supported with K-FAC" in str(w.message)]
    assert len(unsupported) == (1 if with_kfac else 0)  # said once, not a wrong flow
    for name, value in _weights(ref).items():
        assert torch.equal(value, _weights(got)[name]), name
    assert all(cb.skipped == 0 for cb in cbs)  # type: ignore[attr-defined]


def test_one_dashboard_with_every_family_and_matching_tags(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="all")
    fit(measurements(), logger=logger)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    for title in (
        "Sharpness",
        "Hessian top-k",
        "Gradient-flow deviation",
        "Sample variance by layer",
        "Loss barrier",
    ):
        assert title in charts, title
    scalars = acc.Tags()["scalars"]
    matched = {
        title: sorted(t for t in scalars if any(re.search(p, t) for p in patterns))
        for title, patterns in charts.items()
    }
    assert matched["Sample variance by layer"] == [
        "landscape/sample_variance/net.0",
        "landscape/sample_variance/net.4",
    ]
    assert matched["Gradient-flow deviation"] == [
        "landscape/gradient_flow/deviation",
        "landscape/gradient_flow/step_gap",
    ]
    assert matched["Loss barrier"] == ["landscape/landscape/barrier"]
    assert "landscape/sharpness/lambda_max" in matched["Sharpness"]
    images = acc.Tags()["images"]
    assert {
        "landscape/sample_variance/profile",
        "landscape/landscape/surface",
        "landscape/landscape/interpolation",
    } <= set(images)
