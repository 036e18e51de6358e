"""TensorBoard panels: the custom-scalars "Landscape" dashboard and matplotlib figures.

The only module that knows TensorBoard. Callbacks' charts are generated from their metric
declarations (:func:`family_charts` of :mod:`lightning_landscape.metrics`) and written with
:func:`write_layout`; figures drawn from plain numbers
(built in :mod:`lightning_landscape.figures` and re-exported here: :func:`density_figure`,
:func:`profile_figure`, :func:`contour_figure`, :func:`curve_figure`) go out through
:func:`log_figure`. Only global rank 0 with a ``TensorBoardLogger`` writes; otherwise every
write is skipped silently. Figures live on their own Agg canvas: pyplot is never used.

Layouts are *arranged* when written (:func:`arrange`): ratio charts (``.../ratio``, scale-free:
≈ 1 at the edge of stability) come first, and a chart that mixes a stability ``threshold`` or a
``preconditioned`` sharpness with other curves is split, one chart each — whether they share a
scale is not knowable when the layout is written (at initialisation λ_max may sit 100× below
2/η and reach it later; under Adam the preconditioned λ_max is ~1000× the raw one), and one
linear axis over both flattens the smaller curve.

Example::

    >>> charts = [Chart("Sharpness", ("landscape/sharpness/lambda_max",)),
    ...           Chart("Sharpness", ("ignored/duplicate",)),
    ...           Chart("Hessian top-k", (r"landscape/hessian/eig_\\d+$",))]
    >>> layout = layout_proto(charts)
    >>> [c.title for c in layout.category[0].chart]
    ['Sharpness', 'Hessian top-k']
    >>> [c.title for c in arrange([*family_charts(metrics.HESSIAN)[:1], Chart(
    ...     "Sharpness vs stability threshold (heldout)",
    ...     ("landscape/heldout/lambda_max", "landscape/heldout/threshold")),
    ...     Chart("Sharpness / threshold (heldout)", ("landscape/heldout/ratio",))])]
    ['Sharpness / threshold (heldout)', 'Hessian top-k', 'Sharpness (heldout)', 'Stability threshold (heldout)']
    >>> write_layout(None, charts)  # no trainer, no TensorBoardLogger: skipped silently
    False
"""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_landscape import metrics
from lightning_landscape.checks import check_that
from lightning_landscape.figures import (
    contour_figure,
    curve_figure,
    density_figure,
    new_figure,
    profile_figure,
)

__all__ = [
    "CATEGORY",
    "FAMILY_CHARTS",
    "Chart",
    "arrange",
    "contour_figure",
    "curve_figure",
    "density_figure",
    "family_charts",
    "layout_dict",
    "layout_proto",
    "log_data",
    "log_figure",
    "new_figure",
    "profile_figure",
    "renamed",
    "tensorboard_logger",
    "write_layout",
]

#: Default custom-scalars category of the dashboard.
CATEGORY = "Landscape"

_KINDS = ("multiline", "margin")


@dataclass(frozen=True)
class Chart:
    """One custom-scalars chart.

    Args:
        title: Chart title; within a category the first chart of a title wins.
        tags: ``"multiline"``: scalar tags or regexes (TensorBoard regex-searches the tags),
            one series per match. ``"margin"``: exactly ``(value, lower, upper)``.
        kind: ``"multiline"`` or ``"margin"``.

    Raises:
        ValueError: If the title or tags are empty, the kind unknown, or margin tags not three.
    """

    title: str
    tags: tuple[str, ...]
    kind: str = "multiline"

    def __post_init__(self) -> None:
        if not isinstance(self.title, str) or not self.title:
            raise ValueError(f"title must be a non-empty string, got {self.title!r}")
        if isinstance(self.tags, str):
            raise ValueError(f"tags must be a sequence of strings, not a string: {self.tags!r}")
        tags = tuple(self.tags)
        if not tags or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"tags must be non-empty strings, got {self.tags!r}")
        object.__setattr__(self, "tags", tags)
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "margin" and len(tags) != 3:
            raise ValueError(
                f"tags of a margin chart must be (value, lower, upper), got {len(tags)}: {tags!r}"
            )


def family_charts(declarations: Sequence[metrics.Metric], owner: Any = None) -> tuple[Chart, ...]:
    """The custom-scalars charts of a family's :mod:`~lightning_landscape.metrics`
    declarations: one chart per declared ``chart`` title (in order of first declaration), one
    anchored regex ``^landscape/<family>/<quantity>$`` per scalar declared for it. With an
    ``owner`` (a callback), a declaration with an ``option`` counts only if that attribute of
    the owner is set (truthy); without one, every declaration counts.

    Example::

        >>> [c.title for c in family_charts(metrics.GRADIENT_FLOW)]
        ['Gradient-flow deviation']
        >>> family_charts(metrics.HESSIAN)[0].tags
        ('^landscape/hessian/eig_(\\\\d+)$', '^landscape/hessian/lambda_min$')
    """
    tags: dict[str, list[str]] = {}
    for m in declarations:
        if m.chart is None or (owner is not None and m.option and not getattr(owner, m.option)):
            continue
        tags.setdefault(m.chart, []).append(f"^landscape/{m.family}/{metrics.pattern(m)}$")
    return tuple(Chart(title, tuple(t)) for title, t in tags.items())


#: Charts of the families whose charts take no option (``KFAC`` writes its own), generated
#: from :mod:`lightning_landscape.metrics`; other callbacks use :func:`family_charts`.
FAMILY_CHARTS: Mapping[str, tuple[Chart, ...]] = {
    family: family_charts(metrics.declared(family))
    for family in ("gradient_flow", "sample_variance", "landscape", "kfac")
}


_VS_THRESHOLD = " vs stability threshold"
#: Quantities split off into charts of their own, with the title of that chart.
_OWN_CHART = {"preconditioned": "Preconditioned sharpness", "threshold": "Stability threshold"}


def _quantity(tag: str) -> str:
    """The last segment of a tag or anchored tag regex: ``^landscape/x/ratio$`` → ``ratio``."""
    return tag.removesuffix("$").rpartition("/")[2]


def _split_scales(chart: Chart) -> tuple[Chart, ...]:
    """``chart`` without its ``preconditioned`` and ``threshold`` tags, then one chart of each
    of those (if it mixed them with other tags)."""
    if chart.kind != "multiline":
        return (chart,)
    own = {q: tuple(t for t in chart.tags if _quantity(t) == q) for q in _OWN_CHART}
    rest = tuple(t for t in chart.tags if _quantity(t) not in _OWN_CHART)
    if not rest or not any(own.values()):
        return (chart,)
    if _VS_THRESHOLD in chart.title:
        head, suffix = chart.title.split(_VS_THRESHOLD, 1)
        title, names = head + suffix, {q: name + suffix for q, name in _OWN_CHART.items()}
    else:
        title, names = chart.title, {q: f"{chart.title}: {q}" for q in _OWN_CHART}
    parts = [Chart(title, rest)]
    parts.extend(Chart(names[q], tags) for q, tags in own.items() if tags)
    return tuple(parts)


def _is_ratio(chart: Chart) -> bool:
    return chart.kind == "multiline" and all(_quantity(t) == "ratio" for t in chart.tags)


def arrange(charts: Sequence[Chart]) -> tuple[Chart, ...]:
    """The charts as the layout shows them (what :func:`layout_proto` and :func:`write_layout`
    write): first chart of each title; charts of ratios (every tag's last segment ``ratio``)
    first; a multiline chart mixing ``preconditioned`` or ``threshold`` tags with others split
    into the others (the title without " vs stability threshold") followed by a "Preconditioned
    sharpness" and a "Stability threshold" chart (the title's instance suffix, e.g.
    " (heldout)", kept; other titles: "<title>: threshold"); otherwise in order.

    Raises:
        ValueError: If ``charts`` holds a non-:class:`Chart`.
    """
    split = tuple(part for chart in _unique(charts) for part in _split_scales(chart))
    ratios = tuple(c for c in split if _is_ratio(c))
    return _unique((*ratios, *(c for c in split if not _is_ratio(c))))


def renamed(charts: Sequence[Chart], family: str, name: str) -> list[Chart]:
    """``charts`` of a ``family`` for the instance ``name`` (tags ``landscape/<name>/…``, the
    name in the titles); unchanged when ``name`` is the family."""
    if name == family:
        return list(charts)
    old, new = f"landscape/{family}/", f"landscape/{name}/"
    return [
        Chart(f"{c.title} ({name})", tuple(t.replace(old, new) for t in c.tags), c.kind)
        for c in charts
    ]


def _unique(charts: Sequence[Chart]) -> tuple[Chart, ...]:
    """Charts in order, keeping the first chart of each title."""
    seen: dict[str, Chart] = {}
    for chart in charts:
        if not isinstance(chart, Chart):
            raise ValueError(f"charts must hold Chart instances, got {chart!r}")
        seen.setdefault(chart.title, chart)
    return tuple(seen.values())


_NONEMPTY = "a non-empty string"


def layout_dict(charts: Sequence[Chart], category: str = CATEGORY) -> dict[str, Any]:
    """The layout as ``SummaryWriter.add_custom_scalars`` takes it: ``{category: {title:
    ["Multiline" | "Margin", [tags...]]}}`` (the charts as :func:`arrange` lays them out;
    ValueError as in
    :func:`layout_proto`)."""
    check_that("category", category, isinstance(category, str) and category != "", _NONEMPTY)
    return {
        category: {
            c.title: ["Margin" if c.kind == "margin" else "Multiline", list(c.tags)]
            for c in arrange(charts)
        }
    }


def layout_proto(charts: Sequence[Chart], category: str = CATEGORY) -> layout_pb2.Layout:
    """The custom-scalars ``Layout`` protobuf (what TensorBoard reads from the tag
    ``custom_scalars__config__``) of one category: the charts as :func:`arrange` lays them
    out (first chart of each title, ratios first, one chart per scale).

    Raises:
        ValueError: If ``category`` is empty or ``charts`` holds a non-:class:`Chart`.
    """
    check_that("category", category, isinstance(category, str) and category != "", _NONEMPTY)
    protos = []
    for chart in arrange(charts):
        if chart.kind == "margin":
            value, lower, upper = chart.tags
            series = layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)
            content = layout_pb2.MarginChartContent(series=[series])
            protos.append(layout_pb2.Chart(title=chart.title, margin=content))
        else:
            multiline = layout_pb2.MultilineChartContent(tag=list(chart.tags))
            protos.append(layout_pb2.Chart(title=chart.title, multiline=multiline))
    return layout_pb2.Layout(category=[layout_pb2.Category(title=category, chart=protos)])


def tensorboard_logger(trainer: Any) -> TensorBoardLogger | None:
    """The first ``TensorBoardLogger`` of ``trainer.loggers`` (``trainer`` may be ``None``),
    else ``None`` (``logger=False``, CSV only, ``fast_dev_run``)."""
    for logger in getattr(trainer, "loggers", None) or ():
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


def _writer(trainer: Any) -> Any | None:
    """The rank-0 ``SummaryWriter`` of the trainer's TensorBoardLogger, else ``None``."""
    logger = tensorboard_logger(trainer)
    if logger is None or not getattr(trainer, "is_global_zero", True):
        return None
    return logger.experiment


# Charts already written, per SummaryWriter and category (weak keys: writers are not kept alive).
_WRITTEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def write_layout(trainer: Any, charts: Sequence[Chart], category: str = CATEGORY) -> bool:
    """Write the custom-scalars layout to the trainer's TensorBoard run, once.

    Only global rank 0 with a TensorBoardLogger writes. Charts written to a ``SummaryWriter``
    are remembered: a call adding no new title writes nothing; a call adding charts (say, a
    second callback's) rewrites the merged layout, which TensorBoard reads instead of the
    earlier one (it keeps a run's last layout). The writer is flushed at once.

    Args:
        trainer: A Lightning ``Trainer`` (or ``None``).
        charts: Charts to show; duplicate titles keep the first chart.
        category: Category (dashboard section) title.

    Returns:
        ``True`` if written; ``False`` if skipped (not rank 0, no TensorBoardLogger, no news).

    Raises:
        ValueError: If ``category`` is empty or ``charts`` holds a non-:class:`Chart`.
    """
    check_that("category", category, isinstance(category, str) and category != "", _NONEMPTY)
    new = _unique(charts)
    writer = _writer(trainer)
    if writer is None:
        return False
    written = _WRITTEN.get(writer, {})
    merged = _unique((*written.get(category, ()), *new))
    if not merged or merged == written.get(category):
        return False
    categories = {**written, category: merged}
    layout: dict[str, Any] = {}
    for name, name_charts in categories.items():
        layout.update(layout_dict(name_charts, name))
    writer.add_custom_scalars(layout)
    if hasattr(writer, "flush"):
        writer.flush()
    _WRITTEN[writer] = categories
    return True


def _close(figure: Figure) -> None:
    """Release a figure; only pyplot-managed figures need (and get) ``pyplot.close``."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)


def log_figure(trainer: Any, tag: str, figure: Figure, step: int) -> bool:
    """Send a figure to the trainer's TensorBoard run as an image, then close it.

    The figure is consumed (closed) whether or not it is written. Returns ``True`` if written,
    ``False`` if skipped (``trainer`` is ``None``, not rank 0, or has no TensorBoardLogger).
    """
    writer = _writer(trainer)
    if writer is None:
        _close(figure)
        return False
    writer.add_figure(tag, figure, global_step=int(step), close=True)
    return True


def log_data(trainer: Any, tag: str, payload: Mapping[str, Any], step: int) -> bool:
    """Send a JSON-serialisable ``payload`` to the trainer's TensorBoard run as a text summary.

    The text is ``json.dumps(payload)``, written with ``add_text(tag, text, global_step=step)``
    (TensorBoard's text plugin; it lands under ``tag + "/text_summary"``). The "Landscape" tab
    reads it back, e.g. ``landscape/<name>/density_data`` = ``{"grid": [...], "density": [...]}``.
    Returns ``True`` if written, ``False`` if skipped (``trainer`` is ``None``, not rank 0, or
    has no TensorBoardLogger).

    Raises:
        TypeError: If ``payload`` is not JSON-serialisable (checked before skipping).
    """
    text = json.dumps(dict(payload))
    writer = _writer(trainer)
    if writer is None:
        return False
    writer.add_text(tag, text, global_step=int(step))
    return True
