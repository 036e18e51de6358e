"""The plugin's routes over a live TensorBoard on synthetic event files (see ``conftest``)."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape.metrics import FAMILIES, frontend_table
from lightning_landscape.tensorboard_plugin.plugin import STATIC_DIR, LandscapePlugin

from .conftest import LAYERS, STEPS, get, launch, status

ROUTE = "/data/plugin/landscape"


def test_tensorboard_lists_the_tab(board: str) -> None:
    listing = get(f"{board}/data/plugins_listing")["landscape"]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "Landscape"
    assert listing["loading_mechanism"] == {
        "type": "IFRAME", "module_path": f"{ROUTE}/index.js",
    }  # fmt: skip


def test_runs_name_every_instance_and_the_landscape_files(board: str) -> None:
    runs = get(f"{board}{ROUTE}/runs")["runs"]
    assert sorted(runs) == ["a", "b", "c", "linked"]
    a = runs["a"]["instances"]
    assert {name: info["family"] for name, info in a.items()} == {
        "sharpness": "sharpness", "heldout": "sharpness", "hessian": "hessian",
        "gradient_flow": "gradient_flow", "sample_variance": "sample_variance",
        "landscape": "landscape", "kfac": "kfac",
    }  # fmt: skip
    assert "density_data" in a["hessian"]["quantities"]
    assert a["sample_variance"]["quantities"] == sorted([*LAYERS, "last_over_first", "skipped"])
    assert runs["a"]["landscape_steps"] == [45]
    assert runs["b"] == {
        "instances": {"sharpness": {"family": "sharpness", "quantities": ["lambda_max", "ratio", "threshold"]}},
        "landscape_steps": [49],
    }  # fmt: skip


def test_scalars_of_one_instance(board: str) -> None:
    got = get(f"{board}{ROUTE}/scalars?run=a&instance=sharpness")
    assert sorted(got) == ["lambda_max", "preconditioned", "ratio", "threshold"]
    assert got["threshold"] == {"steps": STEPS, "values": [20.0] * len(STEPS)}
    assert got["lambda_max"]["values"][0] == pytest.approx(5.0)
    held = get(f"{board}{ROUTE}/scalars?run=a&instance=heldout")
    assert sorted(held) == ["lambda_max", "ratio"]  # the second Sharpness, apart
    flow = get(f"{board}{ROUTE}/scalars?run=a&instance=gradient_flow")
    assert flow["deviation"]["steps"] == [0, 20, 40]
    hessian = get(f"{board}{ROUTE}/scalars?run=a&instance=hessian")
    assert "density_data" not in hessian and "net.0/eig_1" in hessian  # text is not a scalar
    assert get(f"{board}{ROUTE}/scalars?run=a&instance=nobody") == {}
    assert get(f"{board}{ROUTE}/scalars?run=zz&instance=sharpness") == {}
    assert status(f"{board}{ROUTE}/scalars?run=a") == 400


def test_density_reads_the_json_text_summaries(board: str) -> None:
    got = get(f"{board}{ROUTE}/density?run=a&instance=hessian")
    assert got["steps"] == [0, 15, 30, 45]  # the "not json" text at step 5 is skipped
    assert all(len(g) == len(d) == 30 for g, d in zip(got["grids"], got["densities"]))
    assert got["grids"][0][0] == -1.0
    assert get(f"{board}{ROUTE}/density?run=b&instance=sharpness") == {
        "steps": [], "grids": [], "densities": [],
    }  # fmt: skip


def test_landscape_serves_the_npz_arrays(board: str) -> None:
    a = get(f"{board}{ROUTE}/landscape?run=a&step=45")
    assert len(a["alphas"]) == len(a["betas"]) == 9
    assert len(a["losses"]) == 9 and len(a["losses"][0]) == 9  # rows follow betas
    assert a["losses"][4][4] == pytest.approx(0.2)
    assert a["step"] == 45 and a["bn"] == "batch" and a["keep_1d"] is False
    assert len(a["t"]) == len(a["interpolation"]) == 11 and a["barrier"] == pytest.approx(0.3)
    b = get(f"{board}{ROUTE}/landscape?run=b&step=49")
    assert "betas" not in b and b["losses"][0] is None  # NaN → null
    assert math.isclose(b["losses"][5], 1.0)


@pytest.mark.parametrize(
    "query",
    [
        "run=a&step=44",  # no such file
        "run=..&step=45",  # not a run
        "run=a/..&step=45",
        "run=/etc&step=45",
        "run=b/../a&step=45",
        "run=c&step=1",  # a symlinked .npz file
    ],
)
def test_landscape_refuses_what_is_not_a_run_file(board: str, query: str) -> None:
    assert status(f"{board}{ROUTE}/landscape?{query}") == 404


def test_a_symlinked_run_folder_that_tensorboard_reads_is_served(board: str) -> None:
    assert get(f"{board}{ROUTE}/runs")["runs"]["linked"]["landscape_steps"] == [49]
    assert get(f"{board}{ROUTE}/landscape?run=linked&step=49")["step"] == 49


def test_landscape_checks_its_arguments(board: str) -> None:
    assert status(f"{board}{ROUTE}/landscape?run=a&step=-1") == 400
    assert status(f"{board}{ROUTE}/landscape?run=a&step=4.5") == 400
    assert status(f"{board}{ROUTE}/landscape?run=a") == 400


def test_frontend_files(board: str) -> None:
    index = get(f"{board}{ROUTE}/index.js")
    assert b"export async function render" in index
    for name in (
        "charts.js",
        "declared.js",
        "uPlot.esm.js",
        "uPlot.min.css",
        "style.css",
        "uPlot.LICENSE",
    ):
        assert get(f"{board}{ROUTE}/static/{name}") == (STATIC_DIR / name).read_bytes()
    for name in ("..%2Fplugin.py", "plugin.py", "nope.js", ".hidden", "%2E%2E"):
        assert status(f"{board}{ROUTE}/static/{name}") == 404, name


def test_metrics_serves_the_declarations(board: str) -> None:
    table = get(f"{board}{ROUTE}/metrics")
    assert table == frontend_table()  # what the tab draws is what metrics.py declares
    assert [f["family"] for f in table["families"]] == list(FAMILIES)
    eos = [m for f in table["families"] for m in f["metrics"] if m["panel"] == "eos"]
    assert [(m["quantity"], m["label"], m["dashed"]) for m in eos] == [
        ("lambda_max", "λ_max", False), ("preconditioned", "preconditioned λ_max", False),
        ("threshold", "threshold", True),
    ]  # fmt: skip


def test_the_wheel_registers_the_plugin() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    target = "lightning_landscape.tensorboard_plugin.plugin:LandscapePlugin"
    assert f'[project.entry-points.tensorboard_plugins]\nlandscape = "{target}"' in pyproject
    found = importlib.metadata.entry_points(group="tensorboard_plugins", name="landscape")
    assert [ep.load() for ep in found] == [LandscapePlugin]  # installed (pip install -e .)


def _plugin(logdir: Path) -> LandscapePlugin:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    return LandscapePlugin(base_plugin.TBContext(data_provider=provider, logdir=str(logdir)))


def test_active_only_with_landscape_scalars(tmp_path: Path, logdir: Path) -> None:
    assert _plugin(logdir).is_active()
    other = tmp_path / "other"
    with SummaryWriter(str(other / "run")) as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    assert not _plugin(other).is_active()
    assert not _plugin(tmp_path / "empty").is_active()


def test_the_fast_loader_gives_the_same_answers(logdir: Path, board: str) -> None:
    """TensorBoard's default (Rust data server, where installed) reads the same data."""
    fast = launch(logdir, 4)
    for route in ("runs", "scalars?run=a&instance=hessian", "density?run=a&instance=hessian"):
        assert get(f"{fast}{ROUTE}/{route}") == get(f"{board}{ROUTE}/{route}"), route
