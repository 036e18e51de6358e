"""``LossLandscape``: schedule, values, no observer effect, resume, files, figures, progress."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_landscape.callbacks.landscape import LossLandscape
from lightning_landscape.callbacks.shared import module_loss
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.landscape import (
    filter_normalized_directions,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.measures.operators import ProbeHessian

from ..ddp_workers import one_thread
from .helpers import Net, RecordingLogger, loader, trainer

SMALL = dict(resolution=3, interpolation_resolution=4, probe_size=32, probe_batch_size=16)


@pytest.fixture(autouse=True)
def _in_tmp_path_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # Lightning's default_root_dir is the working directory
    with one_thread():  # tiny models: threads only fight over the 2 cores
        yield


def fit(callbacks, model=None, logger=None, seed=0, data=None, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or Net()
    t = trainer(callbacks, logger=logger, **kwargs)
    t.fit(model, data or loader())
    return model, t


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_observer_effect_and_the_schedule(tmp_path: Path) -> None:
    """Same seed, BN + dropout + shuffled loader: bit-identical with and without the callback;
    measured at step 0, at the requested step, at every epoch end, and at the end once."""
    ref, _ = fit([], max_steps=14)
    log = RecordingLogger()
    cb = LossLandscape(every_n_epochs=1, at_steps=[0, 5], **SMALL)
    got, _ = fit([cb], logger=log, max_steps=14, default_root_dir=str(tmp_path))
    a, b = weights(ref), weights(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    barrier = log.series("landscape/landscape/barrier")
    assert sorted(barrier) == [0, 5, 6, 12, 14]  # 6 steps per epoch; at_end at 14
    assert barrier[0] == 0.0  # θ = θ0: a flat line
    assert all(v >= 0 for v in barrier.values())
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        f"landscape_step{s}.npz" for s in (0, 12, 14, 5, 6)
    ]


def test_values_equal_the_measure_functions_on_the_probe() -> None:
    pl.seed_everything(0, verbose=False)
    initial = weights(Net())
    cb = LossLandscape(**SMALL, at_end=True)
    model, _ = fit([cb], max_steps=6)
    for name, _ in model.named_parameters():  # θ0 kept: the initial weights, on the CPU
        assert torch.equal(cb.vectors[f"init/{name}"], initial[name])
    op = ProbeHessian(model, cb.probe, module_loss(model))
    theta0 = torch.cat([initial[n].reshape(-1) for n in op.names])
    with guard(model, bn="batch", seed=0):  # the default: BatchNorm on batch statistics
        dirs = filter_normalized_directions(op.parameters, count=2, seed=0)
        surface = loss_surface(op, dirs, resolution=3)
        interp = linear_interpolation(op, theta0, resolution=4)
    assert torch.equal(cb.last_surface.losses, surface.losses)
    assert torch.equal(cb.last_interpolation.losses, interp.losses)
    assert cb.last_metrics == {"landscape/landscape/barrier": interp.barrier}
    assert interp.losses[0] > interp.losses[-1]  # training lowered the probe loss
    # with running statistics the numbers differ (the BN handling is a real choice)
    cb_eval = LossLandscape(**SMALL, bn="eval")
    fit([cb_eval], max_steps=6)
    assert not torch.equal(cb_eval.last_surface.losses, surface.losses)


def test_resume_keeps_the_initial_weights(tmp_path: Path) -> None:
    def run(max_steps, callbacks, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = Net(dropout=0.0)
        t = trainer(callbacks, max_steps=max_steps, enable_checkpointing=len(callbacks) > 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint")
            t.fit(model, loader(64, shuffle=False), ckpt_path=ckpt_path)
        return model

    full = LossLandscape(**SMALL)
    run(8, [full])
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    first = LossLandscape(**SMALL)
    run(4, [first, ckpt])
    resumed = LossLandscape(**SMALL)
    path = str(next((tmp_path / "ckpt").glob("*step=4*.ckpt")))
    run(8, [resumed], ckpt_path=path)
    for k, v in full.vectors.items():
        assert torch.equal(resumed.vectors[k], v), k
    assert resumed.last_metrics["landscape/landscape/barrier"] == pytest.approx(
        full.last_metrics["landscape/landscape/barrier"], rel=1e-6
    )
    # a callback whose state is not in the checkpoint cannot know θ0: it says so, logs no barrier
    stranger = LossLandscape(**{**SMALL, "probe_size": 31})
    with pytest.warns(UserWarning, match="without the initial weights"):
        run(8, [stranger], ckpt_path=path)
    assert stranger.last_metrics == {} and stranger.last_interpolation is None
    assert stranger.last_surface is not None


def _events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_npz_figures_and_dashboard_2d(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="run")
    cb = LossLandscape(at_steps=[3], **SMALL)
    fit([cb], logger=logger, max_steps=6)
    logger.experiment.flush()
    saved = np.load(Path(logger.log_dir) / "landscape_step6.npz")
    assert saved["losses"].shape == (3, 3) and saved["alphas"].tolist() == [-1.0, 0.0, 1.0]
    np.testing.assert_array_equal(saved["losses"], cb.last_surface.losses.numpy())
    assert saved["barrier"] == cb.last_interpolation.barrier and saved["t"].shape == (4,)
    assert saved["center"] == saved["losses"][1, 1] and str(saved["bn"]) == "batch"
    assert (Path(logger.log_dir) / "landscape_step3.npz").exists()
    acc = _events(logger.log_dir)
    assert [e.step for e in acc.Images("landscape/landscape/surface")] == [3, 6]
    assert [e.step for e in acc.Images("landscape/landscape/interpolation")] == [3, 6]
    assert [e.step for e in acc.Scalars("landscape/landscape/barrier")] == [3, 6]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category[0].chart] == ["Loss barrier"]


def test_npz_and_figure_1d_without_interpolation(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    log = RecordingLogger()
    cb = LossLandscape(dims=1, interpolate_from_init=False, **SMALL)
    fit([cb], logger=[logger, log], max_steps=3)
    logger.experiment.flush()
    saved = np.load(Path(logger.log_dir) / "landscape_step3.npz")
    assert saved["losses"].shape == (3,) and "betas" not in saved and "barrier" not in saved
    assert cb.vectors == {}  # no θ0 kept
    acc = _events(logger.log_dir)
    assert [e.step for e in acc.Images("landscape/landscape/surface")] == [3]
    assert "landscape/landscape/interpolation" not in acc.Tags()["images"]
    assert not any(k.startswith("landscape/") for k in log.tags())
    assert log.records == [] or all(m for _, m in log.records)  # no empty log calls


def test_without_a_logger_the_npz_goes_to_default_root_dir(tmp_path: Path) -> None:
    cb = LossLandscape(save_npz=True, **SMALL)
    fit([cb], max_steps=2, default_root_dir=str(tmp_path))
    assert cb.last_file == str(tmp_path / "landscape_step2.npz")
    assert (tmp_path / "landscape_step2.npz").exists()


def test_non_finite_loss_is_skipped_training_goes_on(tmp_path: Path) -> None:
    log = RecordingLogger()
    cb = LossLandscape(at_steps=[2], **SMALL)
    _, t = fit(
        [cb], model=Net(nan_at_step=4), logger=log, max_steps=5, default_root_dir=str(tmp_path)
    )
    assert t.global_step == 5
    assert log.series("landscape/landscape/skipped") == {5: 1.0}
    assert list(log.series("landscape/landscape/barrier")) == [2]
    assert [p.name for p in tmp_path.glob("*.npz")] == ["landscape_step2.npz"]


def test_fast_dev_run_does_nothing() -> None:
    cb = LossLandscape(at_steps=[0, 1], **SMALL)
    fit([cb], fast_dev_run=2)
    assert cb.probe is None and cb.last_surface is None and cb.vectors == {}


def test_progress_bar_follows_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    # the TQDM bar explicitly: with `rich` installed (e.g. pulled in by transformers) Lightning
    # would pick its rich bar, whose live display does not reach the captured stdout
    tqdm_bar = pl.callbacks.TQDMProgressBar()
    fit([LossLandscape(**SMALL), tqdm_bar], max_steps=2, enable_progress_bar=True)
    assert "Loss landscape" in capsys.readouterr().out
    fit([LossLandscape(**SMALL)], max_steps=2, enable_progress_bar=False)
    captured = capsys.readouterr()
    assert "Loss landscape" not in captured.out + captured.err


class _RichLike(ProgressBar):
    """A progress bar exposing a rich-style ``progress`` (as ``RichProgressBar`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        outer = self

        class _Progress:
            def add_task(self, description, total):
                outer.calls.append(("add", description, total))
                return 7

            def update(self, task, completed):
                outer.calls.append(("update", task, completed))

            def remove_task(self, task):
                outer.calls.append(("remove", task))

        self.progress = _Progress()

    @property
    def is_enabled(self) -> bool:
        return True


def test_rich_style_progress_bar_gets_a_task() -> None:
    bar = _RichLike()
    fit([LossLandscape(chunk_size=5, **SMALL), bar], max_steps=2, enable_progress_bar=True)
    total = 3**2 + 1 + 4
    assert bar.calls == [
        ("add", "Loss landscape", total),
        ("update", 7, 5),
        ("update", 7, 10),
        ("update", 7, 14),
        ("remove", 7),
    ]


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(at_steps=[1, -2]), "at_steps"),
        (dict(at_steps=5), "at_steps"),
        (dict(at_end="yes"), "at_end"),
        (dict(at_end=False), "at_end"),
        (dict(dims=3), "dims"),
        (dict(resolution=1), "resolution"),
        (dict(interpolation_resolution=1), "interpolation_resolution"),
        (dict(span=0), "span"),
        (dict(span=float("nan")), "span"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(keep_1d=1), "keep_1d"),
        (dict(interpolate_from_init=None), "interpolate_from_init"),
        (dict(save_npz="no"), "save_npz"),
        (dict(bn="train"), "bn"),
        (dict(probe_size=0), "probe_size"),
        (dict(seed=0.5), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`"), warnings.catch_warnings():
        LossLandscape(**kwargs)
