"""The ``KFAC`` Lightning callback: same steps as the plain loop, logging, Sharpness, AMP, resume.

The reference everywhere is :class:`KFACPreconditioner` in a plain loop on the same data. With
validation and measurement callbacks attached (one of them running train-mode forwards and
backwards inside its guard) and with gradient accumulation, the Lightning run equals it.
``Sharpness`` then reports λ_max of the K-FAC-preconditioned Hessian, checked against a dense
float64 ``P^{-1/2} H P^{-1/2}`` built with ``torch.kron``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.kfac import KFAC
from lightning_landscape.callbacks.sharpness import Sharpness
from lightning_landscape.optim.kfac import KFACPreconditioner
from tests.optim.kfac_reference import dense_preconditioner, sym_inverse_sqrt

from .helpers import RecordingLogger

HYPER: dict[str, Any] = dict(
    damping=0.05, factor_update_every=2, inverse_update_every=3, kl_clip=1e-3
)  # fmt: skip


class _Net(pl.LightningModule):
    def __init__(self, dtype: torch.dtype = torch.float64, nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).to(dtype)
        self.nan_at_step = nan_at_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if self.trainer.global_step == self.nan_at_step:
            loss = loss * float("inf")
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def _data(n: int = 24, dtype: torch.dtype = torch.float64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen).to(dtype)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _trainer(callbacks: list[Any], **kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        num_sanity_val_steps=1,
    )  # fmt: skip
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def _loader(batch_size: int, dtype: torch.dtype = torch.float64) -> DataLoader:
    return DataLoader(_data(dtype=dtype), batch_size=batch_size, shuffle=False)


def _plain(steps: int, batch_size: int = 8) -> tuple[nn.Module, KFACPreconditioner]:
    """The reference: the preconditioner in a plain loop, same data order."""
    model = _Net()
    opt = model.configure_optimizers()
    pre = KFACPreconditioner(model, optimizer=opt, **HYPER)
    batches = list(_loader(batch_size))
    for k in range(steps):
        x, y = batches[k % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model.net(x), y).backward()
        pre.step()
        opt.step()
    return model, pre


class _TrainModeProbe(MeasurementCallback):
    """A measurement that runs a train-mode forward + backward (only ``paused()`` hides it)."""

    family = "probe_test"

    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        ctx.pl_module.train()
        loss = ctx.loss_fn(ctx.pl_module, ctx.probe.batches[0])  # type: ignore[union-attr]
        loss.backward()
        return {"loss": float(loss.detach())}


@pytest.mark.parametrize(("batch_size", "accumulate"), [(8, 1), (4, 2)])
def test_callback_equals_the_plain_loop(batch_size: int, accumulate: int) -> None:
    cb = KFAC(**HYPER)
    probe = _TrainModeProbe(every_n_steps=1, probe_size=8, probe_batch_size=8)
    sharp = Sharpness(settle_steps=0, every_n_steps=2, probe_size=8, max_iter=5)
    model = _Net()
    trainer = _trainer(
        [cb, probe, sharp], accumulate_grad_batches=accumulate, val_check_interval=2 * accumulate
    )
    trainer.fit(model, _loader(batch_size), _loader(8))
    reference, pre = _plain(6)
    assert cb.preconditioner is not None and cb.preconditioner.steps == 6
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    got, want = cb.preconditioner.factors(), pre.factors()
    for name in ("net.0", "net.2"):
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert cb.preconditioner.kl_scale == pytest.approx(pre.kl_scale, rel=1e-9)


def test_logged_metrics_only_when_something_happened() -> None:
    logger = RecordingLogger()
    cb = KFAC(**HYPER)
    _trainer([cb], logger=logger, log_every_n_steps=4, max_steps=7).fit(_Net(), _loader(8))
    tag = "landscape/kfac/"
    assert set(logger.series(tag + "factor_seconds")) == {0, 2, 4, 6}
    assert set(logger.series(tag + "inverse_seconds")) == {0, 3, 6}
    assert logger.series(tag + "skipped_layers") == {0: 0.0}
    kl = logger.series(tag + "kl_scale")
    assert set(kl) == {0, 2, 3, 4, 6} and all(0 < v <= 1 for v in kl.values())
    assert logger.series(tag + "damping") == {s: 0.05 for s in kl}
    steps = [s for s, m in logger.records if any(k.startswith(tag) for k in m)]
    assert len(steps) == len(set(steps))  # one record per step, no stale repeats


def test_sharpness_reports_the_kfac_preconditioned_sharpness() -> None:
    logger = RecordingLogger()
    cb = KFAC(**HYPER)
    n = 8 * 3 + 3 + 5 * 8 + 8  # parameters
    sharp = Sharpness(
        settle_steps=0, every_n_steps=5, probe_size=16, probe_batch_size=8, tol=1e-10, max_iter=n
    )
    model = _Net()
    _trainer([cb, sharp], logger=logger, max_steps=5).fit(model, _loader(8))
    pre = cb.preconditioner
    assert pre is not None and pre.kl_scale < 1.0
    params = list(model.parameters())
    x, y = _data()[:16]

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    h = torch.autograd.functional.hessian(
        lambda f: F.cross_entropy(_call(model, params, f, x), y), flat
    )
    s = sym_inverse_sqrt(dense_preconditioner(pre, params))
    want = float(torch.linalg.eigvalsh(s @ h @ s)[-1])
    got = logger.series("landscape/sharpness/preconditioned")
    assert got[5] == pytest.approx(want, rel=1e-8)
    assert 0 not in got  # step 0: no K-FAC step yet, so no preconditioned value
    threshold = logger.series("landscape/sharpness/threshold")[5]
    assert threshold == pytest.approx((2 + 2 * 0.9) / 0.3 / pre.kl_scale, rel=1e-12)
    ratio = logger.series("landscape/sharpness/ratio")[5]
    assert ratio == pytest.approx(want / threshold, rel=1e-8)


def _call(model: nn.Module, params: list[torch.Tensor], flat: torch.Tensor, x: torch.Tensor) -> Any:
    names = [n for n, _ in model.named_parameters()]
    named, off = {}, 0
    for name, p in zip(names, params):
        named[name] = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
    return torch.func.functional_call(model.net, {k[4:]: v for k, v in named.items()}, (x,))


class _Recorder(pl.Callback):
    def __init__(self, kfac: KFAC) -> None:
        self.kfac = kfac
        self.factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        assert self.kfac.preconditioner is not None
        self.factors.append(self.kfac.preconditioner.factors())


def test_16_mixed_on_cpu_divides_the_scale_and_drops_the_skipped_step() -> None:
    cb = KFAC(damping=0.05, factor_update_every=1, inverse_update_every=1, kl_clip=None)
    rec = _Recorder(cb)
    plugin = MixedPrecision("16-mixed", "cpu")
    model = _Net(torch.float32, nan_at_step=2)
    _trainer([cb, rec], plugins=[plugin], max_steps=4).fit(model, _loader(8, torch.float32))
    pre = cb.preconditioner
    assert pre is not None and pre.grad_scaler is plugin.scaler
    assert pre.skipped_steps == 1 and pre.steps == 3
    for name in ("net.0", "net.2"):  # the skipped step (the 3rd) left the factors untouched
        assert torch.equal(rec.factors[2][name][0], rec.factors[1][name][0])
        assert torch.equal(rec.factors[2][name][1], rec.factors[1][name][1])
        assert not torch.equal(rec.factors[3][name][1], rec.factors[1][name][1])
    # the first step's factors equal float32 without AMP (the loss scale 2^16 is divided out)
    ref_model = _Net(torch.float32)
    ref = KFACPreconditioner(ref_model, factor_update_every=1, kl_clip=None)
    x, y = next(iter(_loader(8, torch.float32)))
    F.cross_entropy(ref_model.net(x), y).backward()
    ref.step()
    for name in ("net.0", "net.2"):
        for got, want in zip(rec.factors[0][name], ref.factors()[name]):
            torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-4)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bf16_mixed_trains_with_float32_factors() -> None:
    cb = KFAC(damping=0.05, factor_update_every=1)
    model = _Net(torch.float32)
    _trainer([cb], precision="bf16-mixed", max_steps=3).fit(model, _loader(8, torch.float32))
    assert cb.preconditioner is not None and cb.preconditioner.steps == 3
    for a, g in cb.preconditioner.factors().values():
        assert a.dtype == g.dtype == torch.float32
        assert bool(torch.isfinite(a).all() and torch.isfinite(g).all())


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    whole = _Net()
    cb = KFAC(**HYPER)
    _trainer([cb], max_epochs=4, max_steps=-1).fit(whole, _loader(8))  # 3 steps per epoch
    first = _Net()
    trainer = _trainer([KFAC(**HYPER)], max_epochs=2, max_steps=-1)
    trainer.fit(first, _loader(8))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, cb2 = _Net(), KFAC(**HYPER)
    _trainer([cb2], max_epochs=4, max_steps=-1).fit(
        resumed, _loader(8), ckpt_path=tmp_path / "mid.ckpt"
    )
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)
    assert cb.preconditioner is not None and cb2.preconditioner is not None
    assert cb2.preconditioner.steps == cb.preconditioner.steps == 12
    for name, (a, g) in cb.preconditioner.factors().items():
        a2, g2 = cb2.preconditioner.factors()[name]
        assert torch.equal(a, a2) and torch.equal(g, g2)


def _chart_titles(log_dir: str) -> set[str]:
    """Chart titles of the last custom-scalars layout written to ``log_dir``."""
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return {chart.title for category in layout.category for chart in category.chart}


def test_charts_appear_with_and_without_measurement_callbacks(tmp_path: Path) -> None:
    for sub, callbacks in (("alone", [KFAC()]), ("with", [Sharpness(every_n_steps=5), KFAC()])):
        logger = TensorBoardLogger(tmp_path, name=sub, version=0)
        _trainer(callbacks, logger=logger, max_steps=2).fit(_Net(), _loader(8))
        titles = _chart_titles(logger.log_dir)
        assert {"K-FAC", "K-FAC seconds"} <= titles
        assert ("Sharpness / threshold" in titles) == (sub == "with")


def test_paused_and_bad_arguments() -> None:
    cb = KFAC()
    with cb.paused():  # before fit: a no-op context
        pass
    model = _Net()
    _trainer([cb], max_steps=1).fit(model, _loader(8))
    assert cb.preconditioner is not None
    with cb.paused():
        assert cb.preconditioner._pause_depth == 1
    for kwargs, name in (
        ({"damping": 0}, "damping"),
        ({"inverse_update_every": 0}, "inverse_update_every"),
        ({"kl_clip": "x"}, "kl_clip"),
        ({"loss_reduction": "none"}, "loss_reduction"),
        ({"layers": "["}, "layers"),
        ({"distribute_inverses": "yes"}, "distribute_inverses"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            KFAC(**kwargs)
    copy.deepcopy(KFAC(damping=lambda k: 1e-3))  # schedules are accepted


class _BiasFree(pl.LightningModule):
    """Bias-free Conv2d and Linear (no bias column in their factors) and one Linear with bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, bias=False).double()
        self.mid = nn.Linear(8, 4, bias=False).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.conv(x)).flatten(1))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def _fit_against_dense(
    model: _BiasFree,
) -> tuple[RecordingLogger, Any, torch.Tensor, torch.Tensor]:
    """K-FAC + Sharpness on ``model`` for 5 steps: the log, the preconditioner, the dense
    float64 Hessian of the probe loss and ``S = P^-1/2`` of the preconditioner as used."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 4, 4, generator=gen, dtype=torch.float64)
    data = TensorDataset(x, (x[:, 0, 0, 0] > 0).long() + (x[:, 0, 1, 1] > 0.5).long())
    logger = RecordingLogger()
    cb = KFAC(**HYPER)
    n = sum(p.numel() for p in model.parameters())
    sharp = Sharpness(
        settle_steps=0, every_n_steps=5, probe_size=16, probe_batch_size=8, tol=1e-10, max_iter=n
    )
    loader = DataLoader(data, batch_size=8, shuffle=False)
    _trainer([cb, sharp], logger=logger, max_steps=5).fit(model, loader)
    pre = cb.preconditioner
    assert pre is not None
    params: list[torch.Tensor] = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    names = [name for name, _ in model.named_parameters()]

    def loss(f: torch.Tensor) -> torch.Tensor:
        views = dict(zip(names, torch.split(f, [p.numel() for p in params])))
        named = {k: v.view_as(p) for (k, v), p in zip(views.items(), params)}
        return F.cross_entropy(torch.func.functional_call(model, named, (x[:16],)), data[:16][1])

    h = torch.autograd.functional.hessian(loss, flat)
    return logger, pre, h, sym_inverse_sqrt(dense_preconditioner(pre, params))


def test_sharpness_with_bias_free_layers_equals_the_dense_reference() -> None:
    logger, pre, h, s = _fit_against_dense(_BiasFree())
    assert sorted(pre.layers) == ["conv", "head", "mid"]
    assert [len(layer.params) for layer in pre.layers.values()] == [1, 1, 2]
    want = float(torch.linalg.eigvalsh(s @ h @ s)[-1])
    got = logger.series("landscape/sharpness/preconditioned")
    assert set(got) == {5} and got[5] == pytest.approx(want, rel=1e-8)
    assert want != pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-2)


class _BiasFreeDecay(_BiasFree):
    """The same net under SGD with one L2 decay (0.01) on every parameter."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)


def test_kfac_sharpness_adds_the_decay_after_preconditioning() -> None:
    """SGD(weight_decay) under K-FAC: θ ← θ − η(ν P⁻¹g + wd θ), so the threshold base/ν
    applies to λ_max(P^-1/2 H P^-1/2 + wd/ν I) (a dense float64 reference)."""
    logger, pre, h, s = _fit_against_dense(_BiasFreeDecay())
    want = float(torch.linalg.eigvalsh(s @ h @ s)[-1]) + 0.01 / pre.kl_scale
    got = logger.series("landscape/sharpness/preconditioned")
    assert set(got) == {5} and got[5] == pytest.approx(want, rel=1e-8)
    thr = logger.series("landscape/sharpness/threshold")[5]
    assert logger.series("landscape/sharpness/ratio")[5] == pytest.approx(want / thr, rel=1e-8)
