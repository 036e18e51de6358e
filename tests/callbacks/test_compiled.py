"""A ``torch.compile``d network is measured through its eager code: the same values."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness

from .helpers import RecordingLogger, loader, trainer


class Net(pl.LightningModule):
    def __init__(self, compiled: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        # aot_eager: the aot_autograd path whose graphs have no double backward, without the
        # minutes inductor takes to compile on a CPU
        self.net = net if compiled != "submodule" else torch.compile(net, backend="aot_eager")
        if compiled == "module":
            self.forward = torch.compile(self.forward, backend="aot_eager")  # type: ignore[method-assign]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(compiled: str | None) -> dict[str, dict[int, float]]:
    pytest.importorskip("torch._dynamo")
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    cbs = [
        Sharpness(every_n_steps=3, probe_size=32, tol=1e-8, max_iter=60),
        HessianEigenvalues(k=2, every_n_steps=3, probe_size=32, tol=1e-8, max_iter=60),
    ]
    trainer(cbs, logger=log, max_steps=6).fit(Net(compiled), loader(shuffle=False))
    return {t: log.series(t) for t in log.tags() if t.startswith("landscape/")}


@pytest.mark.parametrize("compiled", ["submodule", "module"])
def test_compiled_values_equal_the_eager_run(compiled: str) -> None:
    eager = _fit(None)
    got = _fit(compiled)
    assert got.keys() == eager.keys() and "landscape/sharpness/lambda_max" in got
    for tag, series in eager.items():
        assert got[tag].keys() == series.keys(), tag
        for step, value in series.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step)
