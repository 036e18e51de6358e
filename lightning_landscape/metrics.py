"""What every callback logs, declared once: tag, meaning, unit, scale, chart and panel.

Each callback family has one tuple of :class:`Metric` (``SHARPNESS``, ``HESSIAN``, ...; the
callback classes reference theirs as ``metrics``). Generated from it: the custom-scalars charts
of each callback (:func:`lightning_landscape.panels.family_charts`), the families table of the
TensorBoard plugin (:mod:`lightning_landscape.tensorboard_plugin.families`, and the
``/metrics`` route the "Landscape" tab reads: :func:`frontend_table`), and the README's metric
table (:func:`markdown`; ``python -m lightning_landscape.metrics --markdown`` prints it).
Pure Python: importing it loads neither torch nor TensorBoard.

A quantity is the part of the tag after ``landscape/<name>/`` and may hold placeholders:
``<i>`` (an integer, e.g. ``eig_<i>``) and ``<module>`` (a module name, without ``/``).

Example::

    >>> [m.quantity for m in SHARPNESS if m.chart == "Sharpness / threshold"]
    ['ratio']
    >>> match("landscape/hessian/eig_12").quantity
    'eig_<i>'
    >>> match("landscape/sample_variance/net.3").meaning[:12], match("landscape/x/y") is None
    ('f = mean_uni', True)
    >>> pattern(metric("hessian", "<module>/eig_1"))
    '([^/]+)/eig_1'
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "GRADIENT_FLOW",
    "HESSIAN",
    "KFAC",
    "LANDSCAPE",
    "SAMPLE_VARIANCE",
    "SECTIONS",
    "SHARPNESS",
    "Metric",
    "declared",
    "frontend_table",
    "markdown",
    "match",
    "metric",
    "pattern",
]

_SCALES = ("linear", "log", "symlog")
_KINDS = ("scalar", "image", "text")
_PLACEHOLDERS = {"i": r"(\d+)", "module": r"([^/]+)"}
_PLACEHOLDER = re.compile(r"<(\w+)>")


@dataclass(frozen=True)
class Metric:
    """One logged quantity ``landscape/<name>/<quantity>`` of a callback family.

    Args:
        quantity: The tag after ``landscape/<name>/``, placeholders ``<i>``, ``<module>``.
        family: The callback family (``Sharpness.family``, ...); ``<name>`` defaults to it.
        meaning: What the value is (the README's text).
        unit: Its unit (``1``: dimensionless; ``loss/θ²``: curvature).
        scale: Natural y-axis: ``"linear"``, ``"log"`` or ``"symlog"`` (signed, decades).
        chart: Title of its custom-scalars chart (``None``: none).
        kind: ``"scalar"`` (a logger scalar), ``"image"`` (a figure) or ``"text"`` (JSON data).
        panel: Kind of the "Landscape" tab panel that draws it (``None``: none).
        label: Its legend label in that panel (placeholders filled from the quantity).
        dashed: Drawn dashed there (references: threshold, λ_min).
        signature: Names the family: an instance is recognised from its signature quantities.
        option: Constructor argument that must be set (truthy) for it to be logged.
        optional: Logged only when something goes wrong (a skipped measurement).
    """

    quantity: str
    family: str
    meaning: str
    unit: str = "1"
    scale: str = "linear"
    chart: str | None = None
    kind: str = "scalar"
    panel: str | None = None
    label: str = ""
    dashed: bool = False
    signature: bool = False
    option: str | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if not self.quantity or not self.family or not self.meaning:
            raise ValueError(f"quantity, family and meaning must be non-empty: {self!r}")
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {self.scale!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        unknown = set(_PLACEHOLDER.findall(self.quantity)) - set(_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)} in {self.quantity!r}")
        if self.chart is not None and self.kind != "scalar":
            raise ValueError(f"only scalars have custom-scalars charts: {self.quantity!r}")

    @property
    def literal(self) -> bool:
        """Whether the quantity is one fixed tag segment (no placeholder)."""
        return _PLACEHOLDER.search(self.quantity) is None

    def tag(self, name: str | None = None) -> str:
        """The tag for instance ``name`` (default: the family), placeholders kept."""
        return f"landscape/{name or self.family}/{self.quantity}"


def _skipped(family: str) -> Metric:
    return Metric(
        "skipped", family, "cumulative count of skipped measurements (any failure inside one: "
        "non-finite loss/HVP, an exception, out of memory; logged when it changes)",
        unit="count", optional=True,
    )  # fmt: skip


_EOS = "Sharpness vs stability threshold"
_CURV = "loss/θ²"
#: ``Sharpness``.
SHARPNESS = (
    Metric("lambda_max", "sharpness", "largest algebraic eigenvalue of the probe-loss Hessian "
           "(warm-started Lanczos)", _CURV, "log", _EOS, panel="eos", label="λ_max",
           signature=True),
    Metric("preconditioned", "sharpness", "λ_max(P^-1/2 H P^-1/2) for diagonally "
           "preconditioned optimizers (Adam, AdamW, SGD with per-group lrs)", _CURV, "log",
           _EOS, panel="eos", label="preconditioned λ_max", signature=True),
    Metric("threshold", "sharpness", "stability threshold of the running optimizer at its "
           "current lr (table below)", _CURV, "log", _EOS, panel="eos", label="threshold",
           dashed=True, signature=True),
    Metric("ratio", "sharpness", "`preconditioned` (or `lambda_max` for unpreconditioned "
           "optimizers) / `threshold`; ≈1 at the edge of stability; also in the progress bar",
           "1", "linear", "Sharpness / threshold", panel="ratio", label="ratio",
           signature=True),
    Metric("rho", "sharpness", "ρ-sharpness max_{‖δ‖≤ρ} L(θ+δ) − L(θ) by `rho_steps` "
           "projected ascent steps (`adaptive=True`: ball in δ/(\\|θ\\|+c))", "loss",
           "linear", "rho-sharpness", signature=True, option="rho"),
    Metric("residual", "sharpness", "relative residual ‖Hv − λv‖/\\|λ\\| of the λ_max "
           "estimate", scale="log"),
    _skipped("sharpness"),
)  # fmt: skip

#: ``HessianEigenvalues``.
HESSIAN = (
    Metric("eig_<i>", "hessian", "the k algebraically largest Hessian eigenvalues "
           "(`eig_1` … `eig_k`), descending", _CURV, "symlog", "Hessian top-k",
           panel="spectrum", label="λ_<i>", signature=True),
    Metric("lambda_min", "hessian", "the smallest eigenvalue (most negative curvature)", _CURV,
           "symlog", "Hessian top-k", panel="spectrum", label="λ_min", dashed=True,
           signature=True),
    Metric("residual", "hessian", "the largest relative residual among the k pairs",
           scale="log"),
    Metric("lambda_min_residual", "hessian", "the relative residual of `lambda_min`",
           scale="log"),
    Metric("trace", "hessian", "Hutch++ estimate of tr(H) (`trace=True`)", _CURV, "symlog",
           "Hessian trace", panel="trace", label="tr(H)", signature=True, option="trace"),
    Metric("<module>/eig_1", "hessian", "λ_max of the Hessian block of one module's "
           "parameters (`per_layer=`)", _CURV, "log", "Per-layer lambda_max",
           panel="layer-eig", label="<module>", option="per_layer"),
    Metric("rmed/<module>", "hessian", "R_med = max_i \\|H_ii\\| / median_i \\|H_ii\\| over "
           "the module's diagonal (Hutchinson; `rmed=True`)", scale="log",
           chart="R_med by layer", panel="layer-rmed", label="<module>", option="rmed"),
    Metric("density", "hessian", "spectral density by stochastic Lanczos quadrature "
           "(`density_every_n_steps=`), as a figure", "—", kind="image",
           option="density_every_n_steps"),
    Metric("density_data", "hessian", "the same density as JSON text `{\"grid\": [...], "
           "\"density\": [...]}`; feeds the Landscape tab's heatmap", "—", kind="text",
           panel="density", signature=True, option="density_every_n_steps"),
    _skipped("hessian"),
)  # fmt: skip

#: ``GradientFlowDeviation``.
GRADIENT_FLOW = (
    Metric("step_gap", "gradient_flow", "(η/2)·‖Hg‖/‖g‖ on the probe (1 HVP + 1 gradient): "
           "relative distance of one step from the flow over the same time; ≈ z/2 on an "
           "eigendirection with z = ηλ; preconditioned optimizers: (η/2)‖P⁻¹HP⁻¹g‖/‖P⁻¹g‖",
           scale="log", chart="Gradient-flow deviation", panel="flow", label="step_gap",
           signature=True),
    Metric("deviation", "gradient_flow", "every `window_every_n_steps`: ‖θ_{s+k} − θ_flow‖ / "
           "‖θ_flow − θ_s‖, the gradient flow from θ_s integrated by RK4 with error-controlled "
           "sub-steps (error ≤ `rtol` × the deviation, from λ_max and λ_min; `h·ρ ≤ rk4_c`) "
           "over the time the optimizer covered in k steps", scale="log",
           chart="Gradient-flow deviation", panel="flow", label="deviation", signature=True),
    Metric("window_steps", "gradient_flow", "k of that window", "steps", signature=True),
    _skipped("gradient_flow"),
)  # fmt: skip

#: ``SampleVarianceDecay``.
SAMPLE_VARIANCE = (
    Metric("<module>", "sample_variance", "f = mean_units(var over samples) / "
           "mean_units(var + mean²) of the module's outputs (pre-activations) on the probe; "
           "conv: unit = channel, positions are samples", "fraction",
           chart="Sample variance by layer", panel="depth", label="<module>"),
    Metric("last_over_first", "sample_variance", "f of the last measured layer / f of the "
           "first", chart="Sample variance last / first", signature=True),
    Metric("profile", "sample_variance", "depth profile: f by layer index on a fixed [0, 1] "
           "axis (first measurement, then every `profile_every_n_steps`)", "—", kind="image"),
    _skipped("sample_variance"),
)  # fmt: skip

#: ``LossLandscape`` (its grids also go to ``landscape_step<step>.npz`` next to the logs).
LANDSCAPE = (
    Metric("barrier", "landscape", "max of the probe loss on the straight line from the "
           "initial weights to θ, minus the larger endpoint", "loss", chart="Loss barrier",
           signature=True, option="interpolate_from_init"),
    Metric("surface", "landscape", "loss on a filter-normalised 1-D line / 2-D grid around θ "
           "(raw grid in `landscape_step<step>.npz` next to the logs)", "loss", kind="image"),
    Metric("interpolation", "landscape", "loss along the straight line init→θ", "loss",
           kind="image", option="interpolate_from_init"),
    _skipped("landscape"),
)  # fmt: skip

#: ``KFAC`` (logged by the callback itself, not a measurement: no ``skipped``).
KFAC = (
    Metric("kl_scale", "kfac", "KL-clipping scale ν ≤ 1 of the last K-FAC step",
           chart="K-FAC", panel="kfac", label="KL scale ν", signature=True, option="kl_clip"),
    Metric("damping", "kfac", "damping λ of the last K-FAC step", _CURV, "log", "K-FAC",
           panel="kfac", label="damping λ", signature=True),
    Metric("factor_seconds", "kfac", "wall time of the last factor update", "s", "log",
           "K-FAC seconds", panel="kfac-seconds", label="factor update", signature=True),
    Metric("inverse_seconds", "kfac", "wall time of the last eigendecomposition", "s", "log",
           "K-FAC seconds", panel="kfac-seconds", label="eigendecomposition", signature=True),
    Metric("skipped_layers", "kfac", "registered layers whose hooks never fired (skipped "
           "with a warning)", "count", signature=True),
)  # fmt: skip

#: Every family's declarations, in the order of the "Landscape" tab's sections.
FAMILIES: Mapping[str, tuple[Metric, ...]] = {
    "sharpness": SHARPNESS,
    "hessian": HESSIAN,
    "sample_variance": SAMPLE_VARIANCE,
    "gradient_flow": GRADIENT_FLOW,
    "landscape": LANDSCAPE,
    "kfac": KFAC,
}
#: Section title of each family in the "Landscape" tab.
SECTIONS: Mapping[str, str] = {
    "sharpness": "Edge of stability",
    "hessian": "Spectrum",
    "sample_variance": "Depth",
    "gradient_flow": "Gradient flow",
    "landscape": "Landscape",
    "kfac": "K-FAC",
}


def declared(family: str) -> tuple[Metric, ...]:
    """The declarations of ``family``.

    Raises:
        KeyError: If the family is unknown.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown metric family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]


def metric(family: str, quantity: str) -> Metric:
    """The declaration of ``quantity`` (as declared, placeholders included) in ``family``."""
    for m in declared(family):
        if m.quantity == quantity:
            return m
    raise KeyError(f"{family!r} declares no quantity {quantity!r}")


def pattern(m: Metric) -> str:
    """The regex (for ``re.fullmatch``, one group per placeholder) of a quantity. A
    placeholder quantity excludes the literal quantities of its family that it would match
    (``<module>`` of ``sample_variance`` is no ``last_over_first``)."""
    parts = _PLACEHOLDER.split(m.quantity)
    regex = "".join(re.escape(p) if i % 2 == 0 else _PLACEHOLDERS[p] for i, p in enumerate(parts))
    if m.literal:
        return regex
    wide = re.compile(regex)
    siblings = FAMILIES.get(m.family, ())
    taken = [re.escape(o.quantity) for o in siblings if o.literal and wide.fullmatch(o.quantity)]
    return f"(?!(?:{'|'.join(taken)})$){regex}" if taken else regex


def match(tag: str) -> Metric | None:
    """The declaration a tag of an instance named as its family matches, else ``None``."""
    family, _, quantity = tag.removeprefix("landscape/").partition("/")
    if not tag.startswith("landscape/") or family not in FAMILIES:
        return None
    return next((m for m in FAMILIES[family] if re.fullmatch(pattern(m), quantity)), None)


def frontend_table() -> dict[str, Any]:
    """What the "Landscape" tab reads (the plugin's ``/metrics`` route): the families in
    section order, each with its title and its metrics (quantity, its ``pattern`` anchored,
    kind, panel, label, dashed, scale, unit, meaning)."""
    return {
        "families": [
            {
                "family": family,
                "section": SECTIONS[family],
                "metrics": [
                    {
                        "quantity": m.quantity,
                        "pattern": f"^{pattern(m)}$",
                        "kind": m.kind,
                        "panel": m.panel,
                        "label": m.label or m.quantity,
                        "dashed": m.dashed,
                        "scale": m.scale,
                        "unit": m.unit,
                        "meaning": m.meaning,
                    }  # fmt: skip
                    for m in decls
                ],
            }
            for family, decls in FAMILIES.items()
        ]
    }


def _rows(decls: Iterable[Metric]) -> list[str]:
    rows, shared = [], False
    for m in decls:
        tag = f"`{m.tag()}`"
        if m.optional:  # the same for every measurement family: one row
            if shared:
                continue
            shared, tag = True, f"`landscape/<name>/{m.quantity}`"
        kind = "" if m.kind == "scalar" else f" ({m.kind})"
        scale = m.scale if m.kind == "scalar" else "—"
        rows.append(f"| {tag}{kind} | {m.meaning} | {m.unit} | {scale} | {m.chart or '—'} |")
    return rows


def markdown() -> str:
    """The README's metric table (one row per declaration; ``skipped`` once)."""
    ordered = [m for f in ("sharpness", "hessian", "gradient_flow", "sample_variance",
                           "landscape", "kfac") for m in FAMILIES[f]]  # fmt: skip
    head = ["| tag | meaning | unit | scale | custom-scalars chart |", "|---|---|---|---|---|"]
    return "\n".join([*head, *_rows(ordered)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_landscape.metrics --markdown`` (README table) or ``--json``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(markdown())
    elif args == ["--json"]:
        import json

        sys.stdout.write(json.dumps(frontend_table(), ensure_ascii=False, indent=1) + "\n")
    else:
        sys.stderr.write("usage: python -m lightning_landscape.metrics --markdown | --json\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
