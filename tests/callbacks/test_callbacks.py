"""Behaviour shared by every measurement callback (a conformance table) and the specifics."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_landscape.callbacks import (
    GradientFlowDeviation,
    HessianEigenvalues,
    SampleVarianceDecay,
    Sharpness,
)
from lightning_landscape.callbacks.base import MeasurementCallback
from lightning_landscape.measures.operators import ProbeHessian, flatten
from lightning_landscape.measures.probe import Probe
from lightning_landscape.optim.stability import stability_of

from .helpers import Net, RecordingLogger, dataset, loader, trainer

CALLBACKS = {
    "sharpness": lambda **kw: Sharpness(rho=0.05, **kw),
    "hessian": lambda **kw: HessianEigenvalues(
        k=2,
        trace=True,
        trace_matvecs=9,
        per_layer=True,
        rmed=True,
        rmed_samples=2,
        density_every_n_steps=5,
        **kw,
    ),
    # windows of 4 steps every 4 steps end on the steps the shared checks measure; the window
    # path in depth (closed forms, resume mid-window) is tested in test_gradient_flow.py
    "gradient_flow": lambda **kw: GradientFlowDeviation(
        window=4, window_every_n_steps=4, settle_steps=0, **kw
    ),
    "sample_variance": lambda **kw: SampleVarianceDecay(**kw),
}


def fit(callbacks, model=None, logger=None, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or Net()
    t = trainer(callbacks, logger=logger, **kwargs)
    t.fit(model, loader())
    return model, t


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_observer_effect_all_callbacks():
    """Same seed, BN + dropout + shuffled loader: with and without callbacks, bit-identical."""
    ref, _ = fit([])
    cbs = [make(every_n_steps=3, probe_size=40, probe_batch_size=16) for make in CALLBACKS.values()]
    got, _ = fit(cbs)
    a, b = weights(ref), weights(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(cb.last_metrics for cb in cbs)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_logs_only_on_measured_steps(name):
    log = RecordingLogger()
    cb = CALLBACKS[name](every_n_steps=4, probe_size=32)
    fit([cb], logger=log)
    steps = sorted({s for s, m in log.records if any(k.startswith("landscape/") for k in m)})
    assert steps == [0, 4, 8, 12]
    assert not any(k.startswith("landscape/") and "train_loss" in k for k in log.tags())
    assert all("landscape" not in k for k in log.tags() if not k.startswith("landscape/"))


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_resume_equals_uninterrupted(name, tmp_path):
    """Checkpoint and resume: logged values and final weights equal an uninterrupted run.

    The model has no dropout, the loader does not shuffle and the checkpoint is at an epoch
    boundary (64 samples / 16), so training itself resumes exactly; what is tested is the
    callback's checkpointed state (warm-start vectors, cadence, counters).
    """

    def run(max_steps, logger, callbacks, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = Net(dropout=0.0)
        t = trainer(
            callbacks,
            logger=logger,
            max_steps=max_steps,
            enable_checkpointing=bool(ckpt_path is None and len(callbacks) > 1),
        )
        t.fit(model, loader(64, shuffle=False), ckpt_path=ckpt_path)
        return model

    make = lambda: CALLBACKS[name](every_n_steps=2, probe_size=32)  # noqa: E731
    log_full = RecordingLogger()
    full_model = run(8, log_full, [make()])
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    log_a, log_b = RecordingLogger(), RecordingLogger()
    run(4, log_a, [make(), ckpt_cb])
    ckpt = next(tmp_path.glob("*step=4*.ckpt"))
    cb_b = make()
    resumed_model = run(8, log_b, [cb_b], ckpt_path=str(ckpt))
    if name != "sample_variance":  # the one callback with no vectors (no solve, no window)
        # warm-start vectors / window snapshot are in the checkpoint (the shared solve's warm
        # start once, with its owner) and the resumed values below depend on them
        state = torch.load(ckpt, weights_only=False)["callbacks"][cb_b.state_key]
        assert state["vectors"] or state["shared_warm"]
    for tag in log_full.tags():
        if tag.startswith("landscape/"):
            full = log_full.series(tag)
            resumed = {**log_a.series(tag), **log_b.series(tag)}
            assert resumed.keys() == full.keys(), tag
            for s in full:
                assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-7), (tag, s)
    for k, v in weights(full_model).items():
        assert torch.equal(v, weights(resumed_model)[k]), k


# SampleVarianceDecay reads activations, not the loss: a NaN loss leaves them finite (its NaN
# skip is tested on NaN activations in test_sample_variance.py)
@pytest.mark.parametrize("name", [n for n in CALLBACKS if n != "sample_variance"])
def test_non_finite_loss_is_skipped_training_goes_on(name):
    log = RecordingLogger()
    cb = CALLBACKS[name](every_n_steps=2, probe_size=32)
    model, t = fit([cb], model=Net(nan_at_step=5), logger=log, max_steps=10)
    assert t.global_step == 10
    skipped = log.series(f"landscape/{cb.family}/skipped")
    assert sorted(skipped) == [6, 8, 10] and skipped[10] == 3.0
    assert cb.skipped == 3


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_fast_dev_run_does_nothing(name):
    cb = CALLBACKS[name](every_n_steps=1)
    fit([cb], fast_dev_run=2)
    assert cb.probe is None and cb.last_metrics == {}


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: Sharpness(every_n_steps=0), "every_n_steps"),
        (lambda: Sharpness(max_overhead=1.5), "max_overhead"),
        (lambda: Sharpness(probe_size=-1), "probe_size"),
        (lambda: Sharpness(bn="train"), "bn"),
        (lambda: Sharpness(max_iter=0), "max_iter"),
        (lambda: Sharpness(preconditioned="yes"), "preconditioned"),
        (lambda: Sharpness(rho=-0.1), "rho"),
        (lambda: Sharpness(rho_steps=0), "rho_steps"),
        (lambda: Sharpness(schedule=5), "schedule"),
        (lambda: HessianEigenvalues(k=0), "k"),
        (lambda: HessianEigenvalues(trace_matvecs=1), "trace_matvecs"),
        (lambda: HessianEigenvalues(per_layer="net.0"), "per_layer"),
        (lambda: HessianEigenvalues(density_every_n_steps=0), "density_every_n_steps"),
    ],
)
def test_bad_arguments_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        make()


def union_operator(model: Net, probe: Probe, bn: str = "eval") -> ProbeHessian:
    from lightning_landscape.callbacks.shared import module_loss

    model.eval()
    return ProbeHessian(model, probe, module_loss(model))


def test_sharpness_sgd_values_against_dense_reference():
    log = RecordingLogger()
    cb = Sharpness(every_n_steps=5, probe_size=40, tol=1e-6, max_iter=60)
    model, t = fit([cb], logger=log, max_steps=5)
    op = union_operator(model, cb.probe)
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.size)])
    exact = float(torch.linalg.eigvalsh((dense + dense.T) / 2)[-1])
    logged = log.series("landscape/sharpness/lambda_max")[5]
    assert logged == pytest.approx(exact, rel=1e-4)
    thr = log.series("landscape/sharpness/threshold")[5]
    assert thr == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert log.series("landscape/sharpness/ratio")[5] == pytest.approx(logged / thr)
    assert "landscape/sharpness/preconditioned" not in log.tags()


def test_sharpness_adam_preconditioned_against_dense_reference():
    log = RecordingLogger()
    cb = Sharpness(every_n_steps=6, probe_size=40, tol=1e-6, max_iter=80, settle_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, t = fit([cb], model=Net(optimizer="adam", lr=1e-2), logger=log, max_steps=6)
    assert any("no state yet" in str(w.message) for w in caught)
    assert 0 not in log.series("landscape/sharpness/preconditioned")  # Adam has no state at step 0
    op = union_operator(model, cb.probe)
    stab = stability_of(t.optimizers[0], op.parameters)
    s = flatten(stab.preconditioner).double().rsqrt()
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.size)]).double()
    exact = float(torch.linalg.eigvalsh(s[:, None] * (dense + dense.T) / 2 * s[None, :])[-1])
    logged = log.series("landscape/sharpness/preconditioned")[6]
    assert logged == pytest.approx(exact, rel=1e-4)
    assert log.series("landscape/sharpness/threshold")[6] == pytest.approx(38 / 1e-2)
    assert log.series("landscape/sharpness/ratio")[6] == pytest.approx(logged / (38 / 1e-2))


def test_unknown_optimizer_warns_once_and_logs_lambda_max_only():
    log = RecordingLogger()
    cb = Sharpness(every_n_steps=2, probe_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([cb], model=Net(optimizer="rmsprop", lr=1e-3), logger=log, max_steps=6)
    assert sum("no stability threshold" in str(w.message) for w in caught) == 1
    assert len(log.series("landscape/sharpness/lambda_max")) == 4
    assert "landscape/sharpness/threshold" not in log.tags()
    assert "landscape/sharpness/ratio" not in log.tags()


def test_shared_solve_computes_lambda_max_once(monkeypatch):
    calls = []
    import lightning_landscape.callbacks.shared as shared_mod

    real = shared_mod.top_eigen

    def counting(*args, **kwargs):
        calls.append(kwargs["k"])
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_mod, "top_eigen", counting)
    log = RecordingLogger()
    sharp = Sharpness(every_n_steps=2, probe_size=32, preconditioned=False)
    hess = HessianEigenvalues(k=3, every_n_steps=4, probe_size=32)
    fit([sharp, hess], logger=log, max_steps=8)
    # steps 0, 4, 8 both measure (one solve with k=3); steps 2, 6 only Sharpness (k=1)
    assert calls == [3, 1, 3, 1, 3]
    both = log.series("landscape/sharpness/lambda_max")
    eig1 = log.series("landscape/hessian/eig_1")
    assert all(both[s] == eig1[s] for s in (0, 4, 8))


def test_hessian_eigenvalues_tags():
    log = RecordingLogger()
    cb = CALLBACKS["hessian"](every_n_steps=4, probe_size=32)
    fit([cb], logger=log, max_steps=4)
    expected = {
        "eig_1",
        "eig_2",
        "lambda_min",
        "residual",
        "trace",
        "net.0/eig_1",
        "net.1/eig_1",
        "net.4/eig_1",
        "rmed/net.0",
        "rmed/net.4",
    }
    assert {f"landscape/hessian/{e}" for e in expected} <= log.tags()
    for _, m in log.records:
        if "landscape/hessian/eig_1" in m:
            assert (
                m["landscape/hessian/eig_1"]
                >= m["landscape/hessian/eig_2"]
                >= m["landscape/hessian/lambda_min"]
            )


def test_training_step_logging_is_silenced_during_measurement():
    log = RecordingLogger()
    fit([Sharpness(every_n_steps=1, probe_size=32)], logger=log, max_steps=3, log_every_n_steps=100)
    assert not any("train_loss" in m for _, m in log.records)


def test_landscape_loss_is_preferred():
    class WithLandscapeLoss(Net):
        def landscape_loss(self, batch):
            self.called = True
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    model = WithLandscapeLoss()
    fit([Sharpness(every_n_steps=2, probe_size=16)], model=model, max_steps=2)
    assert model.called


def test_probe_size_is_respected_and_training_rng_untouched():
    cb = Sharpness(every_n_steps=100, probe_size=40, probe_batch_size=16)
    fit([cb], max_steps=1)
    assert cb.probe.num_samples == 40 and cb.probe.sizes == [14, 13, 13]


def test_probe_dataloader_option():
    from torch.utils.data import DataLoader

    cb = Sharpness(
        every_n_steps=100,
        probe_size=10,
        probe_dataloader=DataLoader(dataset(10, seed=5), batch_size=4),
    )
    fit([cb], max_steps=1)
    assert torch.equal(torch.cat([b[0] for b in cb.probe.batches]), dataset(10, seed=5).tensors[0])


def test_state_keys_distinguish_instances():
    a, b = Sharpness(probe_size=64), Sharpness(probe_size=128)
    assert a.state_key != b.state_key
    assert isinstance(a, MeasurementCallback)


def test_dashboard_layout_and_density_figure_from_attached_callbacks(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="run")
    sharp = Sharpness(every_n_steps=4, probe_size=32)
    hess = HessianEigenvalues(
        k=2, every_n_steps=4, probe_size=32, trace=True, density_every_n_steps=4, density_steps=8
    )
    fit([sharp, hess], logger=logger, max_steps=4)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "Landscape"
    titles = [chart.title for chart in category.chart]
    assert titles == [
        "Sharpness / threshold",
        "Sharpness",
        "Preconditioned sharpness",
        "Stability threshold",
        "Hessian top-k",
        "Hessian trace",
    ]
    assert "landscape/sharpness/lambda_max" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("landscape/hessian/density")] == [0, 4]


def test_two_budgeted_callbacks_sharing_solves_both_keep_measuring():
    """Regression: a callback charged a share of a solve computed before its clock started
    once estimated a 1e-9 s training step and scheduled its next check at step ~1e11."""
    log = RecordingLogger()
    sharp = Sharpness(probe_size=32, max_overhead=0.3)
    hess = HessianEigenvalues(k=2, probe_size=32, max_overhead=0.3)
    fit([sharp, hess], logger=log, max_steps=150)
    for cb in (sharp, hess):
        assert cb.cadence.next_check < 10_000
        assert (
            len(log.series(f"landscape/{cb.family}/" + ("lambda_max" if cb is sharp else "eig_1")))
            >= 3
        )


def test_state_key_keeps_the_checkpointed_form_and_is_computed_once():
    # checkpoints written before the key was cached hold this exact key
    cb = Sharpness()
    expected = (
        "Sharpness{'family': 'sharpness', 'name': 'sharpness', 'probe_size': 'auto', 'bn': 'eval'}"
    )
    assert cb.state_key == expected
    assert cb.state_key is cb.state_key  # Lightning reads it around every hook call
