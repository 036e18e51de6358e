"""The metric declarations (lightning_landscape/metrics.py) against what is really logged, the
callbacks, the README's table and the "Landscape" tab's frontend."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import metrics
from lightning_landscape.callbacks import (
    KFAC,
    GradientFlowDeviation,
    HessianEigenvalues,
    LossLandscape,
    SampleVarianceDecay,
    Sharpness,
)
from lightning_landscape.metrics import Metric
from lightning_landscape.tensorboard_plugin.families import TEXT_SUFFIX
from lightning_landscape.tensorboard_plugin.plugin import STATIC_DIR
from lightning_landscape.zoo import MLP, Classifier, DigitsDataModule

from .tensorboard_plugin.real_run import write_real_logs

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS: dict[str, Any] = {
    "sharpness": Sharpness, "hessian": HessianEigenvalues, "gradient_flow": GradientFlowDeviation,
    "sample_variance": SampleVarianceDecay, "landscape": LossLandscape, "kfac": KFAC,
}  # fmt: skip


def test_every_callback_references_its_family_s_declarations() -> None:
    assert set(CALLBACKS) == set(metrics.FAMILIES)
    for family, cls in CALLBACKS.items():
        assert cls.metrics is metrics.declared(family), cls
        assert getattr(cls, "family", family) == family
        assert all(m.family == family for m in cls.metrics), cls
        quantities = [m.quantity for m in cls.metrics]
        assert len(set(quantities)) == len(quantities), cls
        options = {m.option for m in cls.metrics if m.option}
        assert options <= set(inspect.signature(cls).parameters), (cls, options)
    with pytest.raises(KeyError, match="unknown metric family"):
        metrics.declared("nope")
    with pytest.raises(ValueError, match="scale"):
        Metric("x", "f", "m", scale="cubic")
    with pytest.raises(ValueError, match="placeholder"):
        Metric("x/<layer>", "f", "m")
    with pytest.raises(ValueError, match="only scalars"):
        Metric("x", "f", "m", kind="image", chart="X")


def test_callback_charts_come_from_the_declarations() -> None:
    sharp = Sharpness(every_n_steps=5)
    assert [c.title for c in sharp.charts()] == [
        "Sharpness vs stability threshold", "Sharpness / threshold",
    ]  # fmt: skip
    assert sharp.charts()[0].tags == (
        "^landscape/sharpness/lambda_max$", "^landscape/sharpness/preconditioned$",
        "^landscape/sharpness/threshold$",
    )  # fmt: skip
    assert [c.title for c in Sharpness(every_n_steps=5, rho=0.05).charts()][-1] == "rho-sharpness"
    held = Sharpness(every_n_steps=5, name="heldout").instance_charts()
    assert held[1].title == "Sharpness / threshold (heldout)"
    assert held[1].tags == ("^landscape/heldout/ratio$",)
    hess = HessianEigenvalues(k=2, every_n_steps=5, trace=True, rmed=True)
    assert [c.title for c in hess.charts()] == ["Hessian top-k", "Hessian trace", "R_med by layer"]
    assert [c.title for c in GradientFlowDeviation(every_n_steps=5).charts()] == [
        "Gradient-flow deviation"
    ]
    assert LossLandscape(interpolate_from_init=False).charts() == []


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Logged metrics\n", 1)[1]
    start = section.index("| tag | meaning |")
    return section[start : section.index("\n\n", start) + 1]


def test_the_readme_table_is_the_generated_one() -> None:
    assert _readme_table() == metrics.markdown(), (
        "README.md's metric table is out of date: paste "
        "`python -m lightning_landscape.metrics --markdown` under '## Logged metrics'"
    )
    done = subprocess.run(
        [sys.executable, "-m", "lightning_landscape.metrics", "--markdown"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert done.stdout == metrics.markdown()
    # one row per declaration; the `skipped` of every measurement family in one row
    rows = metrics.markdown().splitlines()[2:]
    declared = [m for decls in metrics.FAMILIES.values() for m in decls]
    assert len(rows) == len(declared) - sum(m.optional for m in declared) + 1


def _extra_run(root: Path) -> None:
    """What the browser test's run does not log: rho, trace, per-layer blocks, R_med."""
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, depth=2, width=16), lr=0.1)
    probe: dict[str, Any] = {"every_n_steps": 2, "probe_size": 64, "probe_batch_size": 64}
    trainer = pl.Trainer(
        max_steps=3, logger=TensorBoardLogger(root, "digits", "extra"), limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=1, callbacks=[
            Sharpness(rho=0.05, rho_steps=2, **probe),
            HessianEigenvalues(k=1, trace=True, trace_matvecs=6, per_layer=True, rmed=True,
                               rmed_samples=2, **probe),
        ],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DigitsDataModule(batch_size=32))


def _logged(root: Path) -> dict[str, set[str]]:
    """``{kind: tags}`` of every ``landscape/*`` tag in the event files under ``root``."""
    out: dict[str, set[str]] = {"scalar": set(), "image": set(), "text": set()}
    for run in {p.parent for p in root.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        out["scalar"] |= set(tags["scalars"])
        out["image"] |= set(tags["images"])
        out["text"] |= {t.removesuffix(TEXT_SUFFIX) for t in tags["tensors"]}
    return {kind: {t for t in tags if t.startswith("landscape/")} for kind, tags in out.items()}


def test_a_real_fit_logs_what_is_declared_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_real_logs(tmp_path, monkeypatch)
    _extra_run(tmp_path)
    logged = _logged(tmp_path)
    assert logged["scalar"] and logged["image"] and logged["text"]
    seen: set[Metric] = set()
    for kind, tags in logged.items():
        for tag in sorted(tags):
            m = metrics.match(tag)
            assert m is not None, f"{tag} is logged but not declared in metrics.py"
            assert m.kind == kind, (tag, m.kind, kind)
            seen.add(m)
    unseen = [
        m.tag() for decls in metrics.FAMILIES.values() for m in decls
        if m not in seen and not m.optional
    ]  # fmt: skip
    assert not unseen, f"declared, not optional, but logged by no configuration: {unseen}"


def test_the_frontend_spells_no_tag() -> None:
    """The Landscape tab reads quantities from the declarations (`/metrics`), not literals."""
    js = {p.name: p.read_text(encoding="utf-8") for p in STATIC_DIR.glob("*.js")}
    ours = {name: text for name, text in js.items() if not name.startswith("uPlot")}
    declared = [m for decls in metrics.FAMILIES.values() for m in decls]
    panels = {m.panel for m in declared if m.panel}
    quoted = re.compile(r"""['"`]([A-Za-z_][\w/]*)['"`]""")
    literals = {q for text in ours.values() for q in quoted.findall(text)}
    read = {m.quantity for m in declared if m.literal and m.kind != "image"}  # images: not read
    spelled = read & literals - panels
    assert not spelled, f"quantities spelled in static/*.js: {sorted(spelled)}"
    # every panel kind a declaration names is drawn by the frontend, and only those read scalars
    index = ours["index.js"]
    drawn = set(
        re.findall(r"picked\(inst, '([\w-]+)'\)|layerOf\('([\w-]+)'\)|pick\('([\w-]+)'", index)
    )
    assert {k for group in drawn for k in group if k} == panels
