"""No observer effect on CUDA: the guard restores everything, training through Lightning on a GPU
is bit-identical with and without measurement callbacks (BatchNorm, dropout on the CUDA RNG,
shuffled loader)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.measures.guard import guard

from ..callbacks.helpers import Net, RecordingLogger, loader, trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fit(callbacks: list, logger: RecordingLogger | None = None) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    model = Net()
    t = trainer(callbacks, logger=logger, accelerator="gpu", devices=1)
    t.fit(model, loader())
    return model


def test_training_on_cuda_is_bit_identical_with_and_without_callbacks() -> None:
    ref = _fit([])
    log = RecordingLogger()
    cbs = [
        Sharpness(every_n_steps=3, probe_size=40, probe_batch_size=16),
        HessianEigenvalues(k=2, trace=True, trace_matvecs=6, every_n_steps=4, probe_size=40),
    ]
    got = _fit(cbs, logger=log)
    assert next(got.parameters()).device.type == "cuda"
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lam = log.series("landscape/sharpness/lambda_max")
    assert sorted(lam) == [0, 3, 6, 9, 12]
    assert all(math.isfinite(v) for v in lam.values())
    assert all(math.isfinite(v) for v in log.series("landscape/hessian/trace").values())


def test_guard_restores_parameters_buffers_grads_modes_and_cuda_rng() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2)).cuda()
    x = torch.randn(16, 4, device="cuda")
    net(x).sum().backward()  # some grads, BatchNorm statistics moved
    net[3].bias.grad = None  # one parameter without a gradient
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [None if p.grad is None else (p.grad, p.grad.clone()) for p in net.parameters()]
    rng = torch.cuda.get_rng_state()
    with guard(net, bn="batch", dropout=True, seed=123):
        loss = net(x).pow(2).mean()
        g = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        sum(gi.sum() for gi in g).backward()
        for p in net.parameters():
            p.data.add_(torch.randn_like(p))  # CUDA RNG draws and parameter changes
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, saved in zip(net.parameters(), grads):
        if saved is None:
            assert p.grad is None
        else:
            assert p.grad is saved[0] and torch.equal(p.grad, saved[1])
