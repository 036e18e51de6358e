"""Tests for lightning_landscape.panels: event files, a live TensorBoard server, figures."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_landscape import metrics
from lightning_landscape.panels import (
    FAMILY_CHARTS,
    Chart,
    arrange,
    contour_figure,
    density_figure,
    family_charts,
    layout_dict,
    layout_proto,
    log_figure,
    new_figure,
    profile_figure,
    tensorboard_logger,
    write_layout,
)

CONFIG_TAG = "custom_scalars__config__"
SHARPNESS = Chart("Sharpness", ("landscape/sharpness/lambda_max", "landscape/sharpness/rho"))
HESSIAN = Chart("Hessian top-k", (r"landscape/hessian/eig_\d+",))
MARGIN = Chart("Band", ("a/value", "a/lower", "a/upper"), kind="margin")
CHARTS = (SHARPNESS, HESSIAN, MARGIN)


def _trainer(logger) -> Trainer:
    return Trainer(
        logger=logger,
        max_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


def _events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _layouts(log_dir: str | Path) -> list[layout_pb2.Layout]:
    acc = _events(log_dir)
    if CONFIG_TAG not in acc.Tags()["tensors"]:
        return []
    layouts = []
    for event in acc.Tensors(CONFIG_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _summary(layout: layout_pb2.Layout) -> dict[str, list[tuple[str, list[str]]]]:
    out = {}
    for category in layout.category:
        charts = []
        for chart in category.chart:
            if chart.HasField("margin"):
                s = chart.margin.series[0]
                charts.append((chart.title, [s.value, s.lower, s.upper]))
            else:
                charts.append((chart.title, list(chart.multiline.tag)))
        out[category.title] = charts
    return out


def test_layout_event_file_decodes_to_the_charts(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = _trainer(logger)
    assert tensorboard_logger(trainer) is logger
    assert write_layout(trainer, CHARTS) is True
    logger.experiment.flush()

    (layout,) = _layouts(logger.log_dir)
    assert layout == layout_proto(CHARTS)
    assert _summary(layout) == {
        "Landscape": [
            (SHARPNESS.title, list(SHARPNESS.tags)),
            ("Hessian top-k", [r"landscape/hessian/eig_\d+"]),
            ("Band", ["a/value", "a/lower", "a/upper"]),
        ]
    }


def test_layout_dict_and_proto_agree_and_dedupe_by_title():
    dup = Chart(SHARPNESS.title, ("other/tag",))
    assert layout_dict([SHARPNESS, dup, MARGIN], "Cat") == {
        "Cat": {
            SHARPNESS.title: ["Multiline", list(SHARPNESS.tags)],
            "Band": ["Margin", ["a/value", "a/lower", "a/upper"]],
        }
    }
    assert _summary(layout_proto([SHARPNESS, dup], "Cat")) == {
        "Cat": [(SHARPNESS.title, list(SHARPNESS.tags))]
    }
    with pytest.raises(ValueError, match="category"):
        layout_proto(CHARTS, category="")
    with pytest.raises(ValueError, match="charts"):
        layout_dict(["not a chart"])  # type: ignore[list-item]


def test_arrange_puts_ratios_first_and_gives_each_scale_its_own_chart(tmp_path):
    """What `Sharpness.charts()` hands over (λ_max, preconditioned and threshold in one chart)
    is laid out as ratio, λ_max, preconditioned, threshold: their scales may differ 100x
    (SGD far from the edge: λ_max ≈ 4, threshold 380; Adam: preconditioned ≈ 1000 λ_max),
    which is not knowable when the layout is written."""
    base = "landscape/sharpness/"
    mixed = Chart(
        "Sharpness vs stability threshold",
        (base + "lambda_max", base + "preconditioned", base + "threshold"),
    )
    ratio = Chart("Sharpness / threshold", (base + "ratio",))
    held = Chart(
        "Sharpness vs stability threshold (heldout)",
        ("landscape/heldout/lambda_max", "landscape/heldout/threshold"),
    )
    held_ratio = Chart("Sharpness / threshold (heldout)", ("landscape/heldout/ratio",))
    other = Chart("Limits", ("^x/threshold$", "^x/value$"))
    charts = [HESSIAN, mixed, ratio, held, held_ratio, other]
    assert [(c.title, c.tags) for c in arrange(charts)] == [
        ("Sharpness / threshold", (base + "ratio",)),
        ("Sharpness / threshold (heldout)", ("landscape/heldout/ratio",)),
        (HESSIAN.title, HESSIAN.tags),
        ("Sharpness", (base + "lambda_max",)),
        ("Preconditioned sharpness", (base + "preconditioned",)),
        ("Stability threshold", (base + "threshold",)),
        ("Sharpness (heldout)", ("landscape/heldout/lambda_max",)),
        ("Stability threshold (heldout)", ("landscape/heldout/threshold",)),
        ("Limits", ("^x/value$",)),
        ("Limits: threshold", ("^x/threshold$",)),
    ]
    # arranged charts stay arranged; margins and single-scale charts stay as is
    arranged = arrange(family_charts(metrics.SHARPNESS))
    assert arrange(arranged) == arranged
    lone = Chart("Limits", (base + "threshold", "^x/threshold$"))
    assert arrange([MARGIN, lone]) == (MARGIN, lone)
    # a split part whose title is taken keeps the first chart of that title
    assert [c.title for c in arrange([SHARPNESS, mixed])] == [
        "Sharpness",
        "Preconditioned sharpness",
        "Stability threshold",
    ]
    # what is written is the arranged layout
    logger = TensorBoardLogger(tmp_path, name="run")
    assert write_layout(_trainer(logger), [mixed, ratio, HESSIAN]) is True
    logger.experiment.flush()
    (layout,) = _layouts(logger.log_dir)
    assert [title for title, _ in _summary(layout)["Landscape"]] == [
        "Sharpness / threshold",
        "Sharpness",
        "Preconditioned sharpness",
        "Stability threshold",
        HESSIAN.title,
    ]
    assert layout_dict([mixed])["Landscape"] == {
        "Sharpness": ["Multiline", [base + "lambda_max"]],
        "Preconditioned sharpness": ["Multiline", [base + "preconditioned"]],
        "Stability threshold": ["Multiline", [base + "threshold"]],
    }


def test_write_layout_twice_writes_once_and_merges_new_charts(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = _trainer(logger)
    assert write_layout(trainer, [SHARPNESS]) is True
    assert write_layout(trainer, [SHARPNESS]) is False
    # Same title, different tags: the first chart wins, nothing new to write.
    assert write_layout(trainer, [Chart(SHARPNESS.title, ("x",))]) is False
    logger.experiment.flush()
    assert len(_layouts(logger.log_dir)) == 1

    # A second callback adds its chart: the merged layout is rewritten once.
    assert write_layout(trainer, [HESSIAN, SHARPNESS]) is True
    assert write_layout(trainer, [HESSIAN]) is False
    logger.experiment.flush()
    layouts = _layouts(logger.log_dir)
    assert len(layouts) == 2
    assert layouts[-1] == layout_proto([SHARPNESS, HESSIAN])


def test_write_layout_keeps_categories_apart(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = _trainer(logger)
    assert write_layout(trainer, [SHARPNESS]) is True
    assert write_layout(trainer, [HESSIAN], category="Other") is True
    logger.experiment.flush()
    assert _summary(_layouts(logger.log_dir)[-1]) == {
        "Landscape": [(SHARPNESS.title, list(SHARPNESS.tags))],
        "Other": [(HESSIAN.title, list(HESSIAN.tags))],
    }


def _no_tb_files(root: Path) -> bool:
    return not list(root.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("kind", ["none", "false", "csv"])
def test_without_tensorboard_logger_everything_is_skipped(tmp_path, kind):
    if kind == "none":
        trainer = None
    elif kind == "false":
        trainer = _trainer(False)
    else:
        trainer = _trainer(CSVLogger(tmp_path, name="csv"))
    assert tensorboard_logger(trainer) is None
    assert write_layout(trainer, CHARTS) is False
    figure, _ = new_figure()
    assert log_figure(trainer, "landscape/x", figure, step=0) is False
    assert _no_tb_files(tmp_path)


def test_non_zero_rank_never_touches_the_writer(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    rank1 = SimpleNamespace(loggers=[logger], is_global_zero=False)
    assert write_layout(rank1, CHARTS) is False
    assert log_figure(rank1, "landscape/x", new_figure()[0], step=0) is False
    assert logger._experiment is None  # the SummaryWriter was never even created
    assert _no_tb_files(tmp_path)


def test_skipped_pyplot_figure_is_closed():
    import matplotlib.pyplot as plt

    figure = plt.figure()
    assert plt.fignum_exists(figure.number)
    assert log_figure(None, "landscape/x", figure, step=0) is False
    assert not plt.fignum_exists(figure.number)


def test_log_figure_adds_an_image(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = _trainer(logger)
    figure = profile_figure(["a", "b"], [1.0, 0.5])
    width, height = (figure.get_size_inches() * figure.dpi).round().astype(int)
    assert log_figure(trainer, "landscape/sample_variance/profile", figure, step=7) is True
    logger.experiment.flush()
    acc = _events(logger.log_dir)
    assert acc.Tags()["images"] == ["landscape/sample_variance/profile"]
    (image,) = acc.Images("landscape/sample_variance/profile")
    assert (image.step, image.width, image.height) == (7, width, height)


def _get_json(opener, url: str):
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.mark.parametrize("load_fast", ["false", "true"])
def test_headless_tensorboard_serves_layout_and_scalars(tmp_path, load_fast):
    if load_fast == "true":
        pytest.importorskip("tensorboard_data_server")
    from tensorboard import program

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = _trainer(logger)
    assert write_layout(trainer, [SHARPNESS])
    assert write_layout(trainer, [SHARPNESS, HESSIAN])  # merged rewrite: TB must show both
    logger.log_metrics({"landscape/sharpness/lambda_max": 1.0}, step=0)
    logger.experiment.flush()

    tb = program.TensorBoard()
    tb.configure(
        argv=[
            None,
            "--logdir",
            str(tmp_path),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "0",
            "--load_fast",
            load_fast,
        ]
    )
    url = tb.launch()  # daemon thread
    assert url.startswith("http://127.0.0.1:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy

    layout: dict = {}
    deadline = time.monotonic() + 20.0
    while not layout and time.monotonic() < deadline:
        layout = _get_json(opener, url + "data/plugin/custom_scalars/layout")
        if not layout:
            time.sleep(0.1)
    (category,) = layout["category"]
    assert category["title"] == "Landscape"
    assert [(c["title"], c["multiline"]["tag"]) for c in category["chart"]] == [
        (SHARPNESS.title, list(SHARPNESS.tags)),
        (HESSIAN.title, list(HESSIAN.tags)),
    ]
    tags = _get_json(opener, url + "data/plugin/scalars/tags")
    assert "landscape/sharpness/lambda_max" in tags["run/version_0"]


def test_chart_validation_names_the_argument():
    with pytest.raises(ValueError, match="title"):
        Chart("", ("a",))
    with pytest.raises(ValueError, match="tags"):
        Chart("t", ())
    with pytest.raises(ValueError, match="tags"):
        Chart("t", "landscape/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        Chart("t", ("a",), kind="bars")
    with pytest.raises(ValueError, match="margin"):
        Chart("t", ("a", "b"), kind="margin")
    assert Chart("t", ["a", "b"]).tags == ("a", "b")  # type: ignore[arg-type]


def _matching(chart: Chart, names: list[str]) -> list[str]:
    # TensorBoard's frontend uses a JS RegExp search; these patterns mean the same in Python.
    return [n for n in names if any(re.search(tag, n) for tag in chart.tags)]


def test_family_charts_select_the_metric_names_of_the_contract():
    names = [
        "landscape/sharpness/lambda_max",
        "landscape/sharpness/preconditioned",
        "landscape/sharpness/threshold",
        "landscape/sharpness/ratio",
        "landscape/sharpness/lambda_max_old",
        "landscape/hessian/eig_1",
        "landscape/hessian/eig_12",
        "landscape/hessian/trace",
        "landscape/hessian/fc1/eig_1",
        "landscape/hessian/fc1/eig_2",
        "landscape/hessian/rmed/fc1",
        "landscape/sample_variance/fc1",
        "landscape/sample_variance/last_over_first",
        "landscape/sample_variance/skipped",
        "landscape/gradient_flow/step_gap",
        "landscape/gradient_flow/deviation",
        "landscape/gradient_flow/window_steps",
        "landscape/landscape/barrier",
        "landscape/kfac/kl_scale",
        "landscape/kfac/damping",
        "landscape/kfac/factor_seconds",
        "landscape/kfac/inverse_seconds",
        "other/landscape/sharpness/ratio",
    ]
    # the charts of the families that take no option; Sharpness and Hessian build theirs
    assert set(FAMILY_CHARTS) == {"gradient_flow", "sample_variance", "landscape", "kfac"}
    every = {f: family_charts(metrics.declared(f)) for f in metrics.FAMILIES}
    assert {f: FAMILY_CHARTS[f] for f in FAMILY_CHARTS} == {f: every[f] for f in FAMILY_CHARTS}
    by_title = {c.title: c for charts in every.values() for c in charts}
    assert len(by_title) == sum(len(charts) for charts in every.values())
    assert {title: _matching(chart, names) for title, chart in by_title.items()} == {
        "Sharpness vs stability threshold": names[:3],
        "Sharpness / threshold": ["landscape/sharpness/ratio"],
        "rho-sharpness": [],
        "Hessian top-k": ["landscape/hessian/eig_1", "landscape/hessian/eig_12"],
        "Hessian trace": ["landscape/hessian/trace"],
        "Per-layer lambda_max": ["landscape/hessian/fc1/eig_1"],
        "R_med by layer": ["landscape/hessian/rmed/fc1"],
        "Gradient-flow deviation": names[14:16],
        "Sample variance by layer": ["landscape/sample_variance/fc1"],
        "Sample variance last / first": ["landscape/sample_variance/last_over_first"],
        "Loss barrier": ["landscape/landscape/barrier"],
        "K-FAC": names[18:20],
        "K-FAC seconds": names[20:22],
    }
    # every pattern is anchored: a lookalike name or another prefix never matches
    assert all(t.startswith("^landscape/") and t.endswith("$") for c in by_title.values()
               for t in c.tags)  # fmt: skip


def test_family_charts_follow_the_options_of_the_owner():
    from types import SimpleNamespace as NS

    hessian = metrics.HESSIAN
    plain = NS(trace=False, per_layer=False, rmed=False, density_every_n_steps=None)
    assert [c.title for c in family_charts(hessian, plain)] == ["Hessian top-k"]
    full = NS(trace=True, per_layer=["fc1"], rmed=True, density_every_n_steps=4)
    assert [c.title for c in family_charts(hessian, full)] == [
        "Hessian top-k", "Hessian trace", "Per-layer lambda_max", "R_med by layer",
    ]  # fmt: skip
    assert [c.title for c in family_charts(metrics.SHARPNESS, NS(rho=None))] == [
        "Sharpness vs stability threshold", "Sharpness / threshold",
    ]  # fmt: skip
    assert family_charts(metrics.LANDSCAPE, NS(interpolate_from_init=False)) == ()
    # the sharpness charts are arranged when written: ratio first, one chart per scale
    assert [c.title for c in arrange(family_charts(metrics.SHARPNESS))] == [
        "Sharpness / threshold", "Sharpness", "Preconditioned sharpness",
        "Stability threshold", "rho-sharpness",
    ]  # fmt: skip


def test_new_figure_is_agg_without_pyplot_state():
    figure, ax = new_figure((4, 3))
    assert isinstance(figure, Figure)
    assert type(figure.canvas).__name__ == "FigureCanvasAgg"
    assert figure.axes == [ax]
    assert figure.get_size_inches().tolist() == [4.0, 3.0]
    with pytest.raises(ValueError, match="figsize"):
        new_figure((0, 3))


def test_density_figure_lines_and_log_axis():
    grid = np.linspace(-1.0, 3.0, 50)
    density = np.exp(-(grid**2))
    figure = density_figure(grid, density, eigenvalues=[2.5, 1.0, 0.5])
    (ax,) = figure.axes[:1]
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 4
    np.testing.assert_array_equal(ax.lines[0].get_xydata(), np.column_stack([grid, density]))
    assert [line.get_xdata()[0] for line in ax.lines[1:]] == [2.5, 1.0, 0.5]
    assert len(density_figure(grid, density).axes[0].lines) == 1
    # zeros in the density are allowed (clipped on the log axis)
    density[:10] = 0.0
    assert density_figure(grid, density).axes[0].get_ylim()[0] > 0
    with pytest.raises(ValueError, match="density"):
        density_figure([0, 1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="density"):
        density_figure([0, 1], [-1.0, 2.0])
    with pytest.raises(ValueError, match="eigenvalues"):
        density_figure([0, 1], [1.0, 2.0], eigenvalues=[float("nan")])


def test_profile_figure_points_and_labels():
    labels = ["conv1", "conv2", "fc1", "fc2", "out"]
    values = [1.0, 0.6, 0.3, 0.1, 0.05]
    figure = profile_figure(labels, values, log_y=True, ylabel="variance fraction")
    (ax,) = figure.axes
    (line,) = ax.lines
    np.testing.assert_array_equal(line.get_xydata(), np.column_stack([np.arange(5), values]))
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "variance fraction"
    with pytest.raises(ValueError, match="labels"):
        profile_figure(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="ylim"):
        profile_figure(["a"], [0.5], ylim=(1.0, 0.0))
    with pytest.raises(ValueError, match="log_y"):
        profile_figure(["a"], [0.0], log_y=True)


def test_profile_figure_axis_is_fixed_so_profiles_compare():
    """BatchNorm (0.72-1.0) and plain (0.1-1.0) depth profiles on the same [0, 1] axis."""
    with_bn = profile_figure(["a", "b", "c"], [1.0, 0.8, 0.72])
    plain = profile_figure(["a", "b", "c"], [1.0, 0.3, 0.1])
    assert with_bn.axes[0].get_ylim() == plain.axes[0].get_ylim() == (0.0, 1.0)
    assert not with_bn.axes[0].lines[0].get_clip_on()  # the marker at f = 1 is drawn whole
    # a value outside the range widens it; None fits the axis to the values
    assert profile_figure(["a", "b"], [0.5, 1.5]).axes[0].get_ylim() == (0.0, 1.5)
    low, high = profile_figure(["a", "b"], [3.0, 5.0], ylim=None).axes[0].get_ylim()
    assert 2.0 < low < 3.0 and 5.0 < high < 6.0
    # on a log axis the bottom follows the values, the top stays at 1
    low, high = profile_figure(["a", "b"], [0.01, 0.5], log_y=True).axes[0].get_ylim()
    assert 0 < low < 0.01 and high == 1.0


def test_contour_figure():
    xs, ys = np.linspace(-1, 1, 7), np.linspace(-1, 1, 5)
    z = xs[None, :] ** 2 + 2 * ys[:, None] ** 2
    figure = contour_figure(xs, ys, z, levels=6)
    assert len(figure.axes) == 2  # the plot and its colour bar
    with pytest.raises(ValueError, match="values"):
        contour_figure(xs, ys, z.T)
    with pytest.raises(ValueError, match="levels"):
        contour_figure(xs, ys, z, levels=1)
