"""Matplotlib figures drawn from plain numbers: spectral density, depth profile, contour, curves.

Pure matplotlib (no TensorBoard, no Lightning): each builder validates its inputs and returns a
:class:`~matplotlib.figure.Figure` on its own Agg canvas; pyplot is never used.
:func:`lightning_landscape.panels.log_figure` sends one to TensorBoard.

Example::

    >>> fig = curve_figure([-1, 0, 1], {"loss": [2.0, 1.0, 2.5]}, xlabel="alpha")
    >>> [line.get_label() for line in fig.axes[0].lines]
    ['loss']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["contour_figure", "curve_figure", "density_figure", "new_figure", "profile_figure"]


def new_figure(figsize: tuple[float, float] = (5.0, 3.5)) -> tuple[Figure, Axes]:
    """A figure with one axes on its own Agg canvas (no pyplot, no global state).

    Raises:
        ValueError: If ``figsize`` is not two positive numbers (inches).

    Example::

        >>> fig, ax = new_figure((4, 3))
        >>> type(fig.canvas).__name__, fig.get_size_inches().tolist()
        ('FigureCanvasAgg', [4.0, 3.0])
    """
    size = tuple(float(s) for s in figsize)
    if len(size) != 2 or not all(np.isfinite(s) and s > 0 for s in size):
        raise ValueError(f"figsize must be two positive numbers, got {figsize!r}")
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _vector(name: str, values: Sequence[float], min_len: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size < min_len or not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} must be a 1-D sequence of at least {min_len} finite numbers, got {values!r}"
        )
    return array


def density_figure(
    grid: Sequence[float],
    density: Sequence[float],
    eigenvalues: Sequence[float] | None = None,
    *,
    title: str = "Hessian spectral density",
    xlabel: str = "eigenvalue",
) -> Figure:
    """Spectral density on a log-y axis, with dashed markers at the top eigenvalues.

    Args:
        grid: Eigenvalue grid (at least two points).
        density: Non-negative density on ``grid``; zeros are clipped on the log axis.
        eigenvalues: Optional top eigenvalues, one vertical dashed line each.
        title: Axes title.
        xlabel: x-axis label.

    Raises:
        ValueError: If lengths differ, values are not finite, or the density is negative or
            all zero.

    Example::

        >>> fig = density_figure([0, 1, 2], [0.1, 1.0, 0.1], eigenvalues=[1.9, 1.2])
        >>> len(fig.axes[0].lines), fig.axes[0].get_yscale()
        (3, 'log')
    """
    x = _vector("grid", grid, min_len=2)
    y = _vector("density", density, min_len=2)
    if x.shape != y.shape:
        raise ValueError(f"density must have len(grid)={x.size} values, got {y.size}")
    if np.any(y < 0) or not np.any(y > 0):
        raise ValueError(f"density must be non-negative and not all zero, got {density!r}")
    figure, ax = new_figure()
    ax.plot(x, y, color="C0", label="density")
    ax.set_yscale("log", nonpositive="clip")
    ax.set_ylim(bottom=max(y[y > 0].min(), y.max() * 1e-12))
    if eigenvalues is not None:
        marks = _vector("eigenvalues", eigenvalues, min_len=0)
        for i, value in enumerate(marks):
            ax.axvline(value, color="C3", ls="--", lw=0.8, label="top-k" if i == 0 else None)
        ax.legend(loc="best", fontsize="small")
    ax.set(title=title, xlabel=xlabel, ylabel="density")
    return figure


def profile_figure(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str = "Sample variance by layer",
    ylabel: str = "fraction",
    xlabel: str = "layer",
    log_y: bool = False,
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> Figure:
    """A per-layer profile: one marked line over the layer index, ticks named by layer.

    The y axis is fixed (by default [0, 1], the range of a fraction such as the sample-variance
    fraction) so that the profiles of different runs and steps compare at a glance: a run that
    stays at 0.7-1.0 and one that falls to 0.1 are drawn on the same axis.

    Args:
        labels: Layer names, in depth order.
        values: One finite value per layer (positive if ``log_y``).
        title: Axes title.
        ylabel: y-axis label.
        xlabel: x-axis label.
        log_y: Log-scale y axis.
        ylim: ``(bottom, top)`` of the y axis, widened to show any value outside it; ``None``
            fits the axis to the values. On a log axis a bottom ≤ 0 is left to fit the values.

    Raises:
        ValueError: If lengths differ, values are not finite (or not positive with log_y), or
            ``ylim`` is not two finite numbers with bottom < top.

    Example::

        >>> fig = profile_figure(["fc1", "fc2", "fc3"], [1.0, 0.5, 0.25])
        >>> fig.axes[0].lines[0].get_xydata().tolist()
        [[0.0, 1.0], [1.0, 0.5], [2.0, 0.25]]
        >>> [float(v) for v in fig.axes[0].get_ylim()]
        [0.0, 1.0]
    """
    y = _vector("values", values)
    names = [str(label) for label in labels]
    if len(names) != y.size:
        raise ValueError(f"labels must have len(values)={y.size} entries, got {len(names)}")
    if log_y and np.any(y <= 0):
        raise ValueError(f"values must be positive with log_y=True, got {values!r}")
    limits = None
    if ylim is not None:
        limits = _vector("ylim", ylim, min_len=2)
        if limits.size != 2 or not limits[0] < limits[1]:
            raise ValueError(f"ylim must be (bottom, top) with bottom < top, got {ylim!r}")
    figure, ax = new_figure()
    index = np.arange(y.size, dtype=float)
    # clip_on=False: markers on the fixed limits (f = 1 at the first layer) are drawn whole
    ax.plot(index, y, marker="o", color="C0", clip_on=False)
    tilt = y.size > 4
    ax.set_xticks(index, names, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    if log_y:
        ax.set_yscale("log")
    if limits is not None:
        bottom, top = float(min(limits[0], y.min())), float(max(limits[1], y.max()))
        if log_y and bottom <= 0:
            ax.set_ylim(top=top)
        else:
            ax.set_ylim(bottom, top)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return figure


def contour_figure(
    x: Sequence[float],
    y: Sequence[float],
    values: Sequence[Sequence[float]],
    *,
    title: str = "Loss landscape",
    levels: int = 20,
) -> Figure:
    """Filled contour of a 2-D grid, e.g. the loss on two filter-normalised directions.

    Args:
        x: Coordinates along the first direction (columns of ``values``), at least two.
        y: Coordinates along the second direction (rows of ``values``), at least two.
        values: ``len(y) x len(x)`` grid of finite values.
        title: Axes title.
        levels: Number of contour levels, at least 2.

    Raises:
        ValueError: If shapes disagree, values are not finite, or ``levels < 2``.
    """
    xs = _vector("x", x, min_len=2)
    ys = _vector("y", y, min_len=2)
    z = np.asarray(values, dtype=float)
    if z.shape != (ys.size, xs.size) or not np.all(np.isfinite(z)):
        raise ValueError(
            f"values must be a finite (len(y), len(x))=({ys.size}, {xs.size}) grid, "
            f"got shape {z.shape}"
        )
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    figure, ax = new_figure((5.0, 4.0))
    filled = ax.contourf(xs, ys, z, levels=levels, cmap="viridis")
    ax.contour(xs, ys, z, levels=levels, colors="k", linewidths=0.3)
    figure.colorbar(filled, ax=ax)
    ax.set(title=title, xlabel="direction 1", ylabel="direction 2")
    return figure


def curve_figure(
    x: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    title: str = "Loss along a direction",
    xlabel: str = "alpha",
    ylabel: str = "loss",
    marks: Mapping[str, float] | None = None,
    log_y: bool = False,
) -> Figure:
    """One or more named curves over a common 1-D grid, e.g. the loss along a direction.

    Args:
        x: Grid, at least two finite points.
        curves: ``{label: values}``, each with one finite value per grid point (positive if
            ``log_y``); at least one curve.
        title: Axes title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        marks: Optional ``{label: x}`` vertical dotted markers (e.g. the current weights).
        log_y: Log-scale y axis.

    Raises:
        ValueError: If there is no curve, a curve's length differs from ``x``, or values are
            not finite (or not positive with ``log_y``).
    """
    xs = _vector("x", x, min_len=2)
    if not curves:
        raise ValueError("curves must hold at least one {label: values} entry, got none")
    figure, ax = new_figure()
    for i, (label, values) in enumerate(curves.items()):
        y = _vector(f"curves[{label!r}]", values, min_len=2)
        if y.shape != xs.shape:
            raise ValueError(f"curves[{label!r}] must have len(x)={xs.size} values, got {y.size}")
        if log_y and np.any(y <= 0):
            raise ValueError(f"curves[{label!r}] must be positive with log_y=True, got {values!r}")
        ax.plot(xs, y, color=f"C{i}", label=str(label))
    for label, where in (marks or {}).items():
        value = float(where)
        if not np.isfinite(value):
            raise ValueError(f"marks[{label!r}] must be a finite number, got {where!r}")
        ax.axvline(value, color="0.4", ls=":", lw=0.9, label=str(label))
    if log_y:
        ax.set_yscale("log")
    if len(curves) > 1 or marks:
        ax.legend(loc="best", fontsize="small")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return figure
