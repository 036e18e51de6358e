"""Tags → callback instances: the pure mapping the Landscape tab groups its panels by."""

from __future__ import annotations

import re

from lightning_landscape import metrics
from lightning_landscape.tensorboard_plugin.families import FAMILIES, families, layers

T = "landscape/"


def test_every_family_with_its_quantities() -> None:
    tags = [
        *(T + f"sharpness/{q}" for q in ("lambda_max", "preconditioned", "threshold", "ratio")),
        *(T + f"sharpness/{q}" for q in ("rho", "residual", "skipped")),
        *(T + f"hessian/{q}" for q in ("eig_1", "eig_2", "eig_10", "lambda_min", "trace")),
        T + "hessian/net.0/eig_1", T + "hessian/rmed/net.0", T + "hessian/residual",
        T + "hessian/density_data/text_summary",
        T + "gradient_flow/step_gap", T + "gradient_flow/deviation", T + "gradient_flow/window_steps",
        T + "sample_variance/net.layers.0", T + "sample_variance/net.layers.1",
        T + "sample_variance/last_over_first", T + "sample_variance/skipped",
        T + "landscape/barrier",
        *(T + f"kfac/{q}" for q in ("kl_scale", "damping", "factor_seconds", "inverse_seconds")),
        "train_loss", "epoch", "hp_metric",
    ]  # fmt: skip
    got = families(tags)
    assert {name: family for name, (family, _) in got.items()} == {
        "sharpness": "sharpness", "hessian": "hessian", "gradient_flow": "gradient_flow",
        "sample_variance": "sample_variance", "landscape": "landscape", "kfac": "kfac",
    }  # fmt: skip
    assert got["sharpness"][1] == (
        "lambda_max", "preconditioned", "ratio", "residual", "rho", "skipped", "threshold",
    )  # fmt: skip
    assert got["hessian"][1] == (
        "density_data", "eig_1", "eig_10", "eig_2", "lambda_min", "net.0/eig_1", "residual",
        "rmed/net.0", "trace",
    )  # fmt: skip
    assert got["gradient_flow"][1] == ("deviation", "step_gap", "window_steps")
    assert got["sample_variance"][1] == (
        "last_over_first", "net.layers.0", "net.layers.1", "skipped",
    )  # fmt: skip
    assert got["landscape"][1] == ("barrier",)
    assert got["kfac"][1] == ("damping", "factor_seconds", "inverse_seconds", "kl_scale")


def test_instances_are_recognised_by_quantities_not_names() -> None:
    got = families([
        T + "heldout/lambda_max", T + "heldout/ratio",       # a second Sharpness
        T + "sharpness/lambda_max",
        T + "sharpness/held/out/lambda_max",                 # a name with inner '/'
        T + "deep/spectrum/eig_1", T + "deep/spectrum/lambda_min",
        T + "deep/spectrum/block.3/eig_1",                   # its per-layer block, not an instance
        T + "depth/conv1", T + "depth/last_over_first",      # SampleVarianceDecay(name="depth")
        T + "flow2/step_gap",
    ])  # fmt: skip
    assert got == {
        "deep/spectrum": ("hessian", ("block.3/eig_1", "eig_1", "lambda_min")),
        "depth": ("sample_variance", ("conv1", "last_over_first")),
        "flow2": ("gradient_flow", ("step_gap",)),
        "heldout": ("sharpness", ("lambda_max", "ratio")),
        "sharpness": ("sharpness", ("lambda_max",)),
        "sharpness/held/out": ("sharpness", ("lambda_max",)),
    }


def test_tags_nobody_explains_are_ignored() -> None:
    assert families([]) == {}
    assert families(["loss", "landscape/", "landscape/x", "landscape/foo/skipped"]) == {}
    # a family's quantity under an instance without a signature quantity is not an instance
    assert families([T + "a/residual", T + "b/window_steps"]) == {
        "b": ("gradient_flow", ("window_steps",))
    }
    # other text summaries are not density data
    assert families([T + "hessian/notes/text_summary"]) == {}


def _example(m: metrics.Metric) -> str:
    """A quantity of ``m`` with its placeholders filled (``eig_<i>`` → ``eig_3``)."""
    return re.sub(r"<(\w+)>", lambda g: "3" if g[1] == "i" else "net.3", m.quantity)


def test_the_families_table_is_generated_from_the_declarations() -> None:
    assert list(FAMILIES) == list(metrics.FAMILIES)
    for family, decls in metrics.FAMILIES.items():
        signature, every = (re.compile(p) for p in FAMILIES[family])
        for m in decls:
            q = _example(m)
            assert every.fullmatch(q), (family, q)
            assert bool(signature.fullmatch(q)) == m.signature, (family, q)
        # an instance named anything: its signature quantities name the family, the rest join
        suffix = {"text": "/text_summary"}
        tags = [f"landscape/run/x/{_example(m)}{suffix.get(m.kind, '')}" for m in decls]
        got = families(t for t, m in zip(tags, decls) if m.kind != "image")
        logged = sorted(_example(m) for m in decls if m.kind != "image")
        assert got == {"run/x": (family, tuple(logged))}, family


def test_layers_in_depth_order() -> None:
    qs = ["net.10", "net.2", "last_over_first", "net.1.conv", "net.1", "skipped", "fc"]
    assert layers(qs) == ["fc", "net.1", "net.1.conv", "net.2", "net.10"]
