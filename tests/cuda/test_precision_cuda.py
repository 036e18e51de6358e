"""Sharpness under mixed precision on CUDA: measurements run in float32 on the float32 weights.

Training under ``16-mixed`` (fp16 autocast + GradScaler) or ``bf16-mixed`` changes the
trajectory, not the measurement: what the callback logs at a step equals a float32 measurement
of the same weights (the master weights) with the same optimizer state, made afterwards outside
Lightning, and it is finite.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from lightning_landscape.callbacks import Sharpness
from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.operators import ProbeHessian, flatten
from lightning_landscape.measures.sharpness import preconditioned_lambda_max
from lightning_landscape.optim import stability_of

from ..callbacks.helpers import Net, RecordingLogger, loader, trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = 6


def _loss(module: Net, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module.net(x), y)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_preconditioned_sharpness_is_an_fp32_measurement(precision: str) -> None:
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    pl.seed_everything(0, verbose=False)
    model = Net(optimizer="adam", lr=0.01, dropout=0.0)
    cb = Sharpness(
        schedule=lambda step: step == STEPS,
        probe_size=48,
        probe_batch_size=16,
        tol=1e-6,
        max_iter=60,
    )
    log = RecordingLogger()
    t = trainer(
        [cb], logger=log, accelerator="gpu", devices=1, precision=precision, max_steps=STEPS,
        deterministic=False,
    )  # fmt: skip
    t.fit(model, loader())
    assert t.global_step == STEPS
    pre_logged = log.series("landscape/sharpness/preconditioned")
    lam_logged = log.series("landscape/sharpness/lambda_max")
    assert STEPS in pre_logged and STEPS in lam_logged, log.tags()
    assert math.isfinite(pre_logged[STEPS]) and math.isfinite(lam_logged[STEPS])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    # the same measurement, in float32, of the final weights (those measured at STEPS)
    assert cb.probe is not None
    with guard(model, seed=0):
        op = ProbeHessian(model, cb.probe, _loss)  # type: ignore[arg-type]
        assert op.dtype == torch.float32 and op.device.type == "cuda"
        stab = stability_of(t.optimizers[0], op.parameters)
        assert stab is not None and stab.preconditioner is not None
        diag = flatten([p.reshape(-1) for p in stab.preconditioner]).to(op.dtype)
        pre = preconditioned_lambda_max(op, diag, max_iter=100, tol=1e-8)
        lam = top_eigen(op, k=1, max_iter=100, tol=1e-8)
    assert pre_logged[STEPS] == pytest.approx(pre.lambda_max, rel=1e-4)
    assert lam_logged[STEPS] == pytest.approx(lam.lambda_max, rel=1e-4)
    ratio = log.series("landscape/sharpness/ratio")
    assert math.isfinite(ratio[STEPS]) and ratio[STEPS] > 0
