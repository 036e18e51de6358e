"""``SampleVarianceDecay``: logged values, BatchNorm mode, observer effect, figure, arguments."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import panels
from lightning_landscape.callbacks.sample_variance import SampleVarianceDecay
from lightning_landscape.callbacks.shared import module_loss
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.variance import sample_variance

from .helpers import Net, RecordingLogger, dataset, loader, trainer

BASE = "landscape/sample_variance/"


def fit(callbacks, model=None, logger=None, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or Net()
    t = trainer(callbacks, logger=logger, **kwargs)
    t.fit(model, loader())
    return model, t


def _reference(initial: Net, cb: SampleVarianceDecay, bn: str) -> dict[str, float]:
    """What the callback must log at step 0: the measure on its probe, guarded the same way."""
    assert cb.probe is not None
    with guard(initial, bn=bn, seed=0):  # type: ignore[arg-type]
        res = sample_variance(initial, cb.probe, forward=module_loss(initial))
    return {BASE + k: v for k, v in res.as_dict().items()} | {
        BASE + "last_over_first": res.last_over_first
    }


@pytest.mark.parametrize("bn", ["batch", "eval"])
def test_logs_the_measure_on_the_probe_at_init(bn: str) -> None:
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    model = Net()
    initial = copy.deepcopy(model)
    kwargs = {} if bn == "batch" else {"bn": "eval"}
    cb = SampleVarianceDecay(every_n_steps=5, probe_size=40, probe_batch_size=16, **kwargs)
    fit([cb], model=model, logger=log, max_steps=6)
    assert cb.bn == bn  # "batch" is the default
    step0 = {k: v for s, m in log.records if s == 0 for k, v in m.items() if k.startswith(BASE)}
    expected = _reference(initial, cb, bn)
    assert list(step0) == [BASE + "net.0", BASE + "net.4", BASE + "last_over_first"]
    assert step0 == pytest.approx(expected, rel=1e-12)
    assert sorted(log.series(BASE + "net.0")) == [0, 5]  # only measured steps
    assert cb.last_result is not None and cb.last_result.num_samples == (40, 40)


def test_batchnorm_mode_matters_at_init() -> None:
    """Fresh BatchNorm with running statistics is the identity: "eval" sees no normalisation."""
    results = {}
    for bn in ("batch", "eval"):
        cb = SampleVarianceDecay(every_n_steps=100, probe_size=48, bn=bn)  # type: ignore[arg-type]
        fit([cb], max_steps=1)
        results[bn] = cb.last_metrics[BASE + "net.4"]
    # the second Linear's input is tanh(BN(h)); batch statistics centre h, running ones do not
    assert abs(results["batch"] - results["eval"]) > 1e-2


def test_no_observer_effect() -> None:
    """BN + dropout + shuffled loader: bit-identical weights with and without the callback."""
    ref, _ = fit([])
    cb = SampleVarianceDecay(every_n_steps=2, probe_size=40, probe_batch_size=16)
    got, _ = fit([cb])
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cb.last_metrics


def test_named_modules_only() -> None:
    cb = SampleVarianceDecay(every_n_steps=100, probe_size=32, modules=["net.4", "net.1"])
    fit([cb], max_steps=1)
    assert list(cb.last_metrics) == [BASE + "net.1", BASE + "net.4", BASE + "last_over_first"]
    assert 0.0 < cb.last_metrics[BASE + "net.1"] <= 1.0


def test_non_finite_probe_is_skipped_training_goes_on() -> None:
    x, y = dataset().tensors
    x = x.clone()
    x[3, 2] = float("nan")
    probe = DataLoader(TensorDataset(x, y), batch_size=16)
    cb = SampleVarianceDecay(every_n_steps=2, probe_size=32, probe_dataloader=probe)
    with pytest.warns(UserWarning, match="skipped a measurement"):
        model, _ = fit([cb], max_steps=4)
    assert cb.last_metrics == {BASE + "skipped": 3.0}
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules": "net.0"}, "`modules` must be a non-empty list of module names or None"),
        ({"modules": []}, "`modules` must be a non-empty list"),
        ({"modules": ["net.0", 3]}, "`modules` must be a non-empty list"),
        ({"profile_every_n_steps": 0}, "`profile_every_n_steps` must be a positive integer"),
        ({"profile_every_n_steps": True}, "`profile_every_n_steps` must be a positive integer"),
        ({"bn": "train"}, "`bn` must be 'eval' or 'batch', got 'train'"),
        ({"probe_size": 0}, "`probe_size` must be a positive integer, got 0"),
        ({"max_overhead": -1.0}, "max_overhead"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SampleVarianceDecay(**kwargs)


def test_unknown_module_fails_before_training() -> None:
    cb = SampleVarianceDecay(modules=["net.0", "net.9"])
    with pytest.raises(
        ValueError, match=r"`modules` names modules the model does not have: \['net.9'\]"
    ):
        fit([cb], max_steps=1)


def test_charts_profile_figure_and_state(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    cb = SampleVarianceDecay(every_n_steps=2, probe_size=32, profile_every_n_steps=4)
    assert cb.charts() == list(panels.FAMILY_CHARTS["sample_variance"])
    logger = TensorBoardLogger(tmp_path, name="run")
    fit([cb], logger=logger, max_steps=8)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images(BASE + "profile")] == [0, 4, 8]
    assert acc.Images(BASE + "profile")[0].width > 100
    scalars = acc.Tags()["scalars"]
    assert {BASE + "net.0", BASE + "net.4", BASE + "last_over_first"} <= set(scalars)
    assert [e.step for e in acc.Scalars(BASE + "net.0")] == [0, 2, 4, 6, 8]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    titles = [chart.title for chart in layout.category[0].chart]
    assert titles == ["Sample variance by layer", "Sample variance last / first"]
    assert cb.state_key != SampleVarianceDecay(modules=["net.0"]).state_key
    state = cb.state_dict()
    assert state["last_profile_step"] == 8
    fresh = SampleVarianceDecay(profile_every_n_steps=4)
    fresh.load_state_dict(state)
    assert not fresh._profile_due(11) and fresh._profile_due(12)
    never = SampleVarianceDecay(every_n_steps=2, probe_size=32, profile_every_n_steps=None)
    logger2 = TensorBoardLogger(tmp_path, name="none")
    fit([never], logger=logger2, max_steps=2)
    logger2.experiment.flush()
    acc2 = EventAccumulator(logger2.log_dir, size_guidance={"images": 0})
    acc2.Reload()
    assert acc2.Tags()["images"] == []
    assert math.isfinite(never.last_metrics[BASE + "last_over_first"])
