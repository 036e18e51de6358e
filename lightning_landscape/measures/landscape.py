"""Loss landscapes: filter-normalised random directions, 1-D/2-D grids, interpolation from θ0.

Following Li et al. 2018 (1712.09913):

- :func:`filter_normalized_directions` draws Gaussian directions ``d`` and rescales every
  *filter* of ``d`` to the norm of the same filter of θ. A filter is a slice along the first
  dimension of a parameter with at least two dimensions: an output row of a ``Linear`` weight
  ``(out, in)``, an output channel of a ``Conv*d`` weight ``(out, in/groups, *kernel)``.
  Biases and other 1-D (or 0-D) parameters, BatchNorm's affine parameters among them, are
  zeroed by default; ``keep_1d=True`` keeps them, each rescaled as a whole to the norm of the
  parameter. Numbers are drawn on the CPU from a generator seeded with ``seed`` in parameter
  order (for every parameter, kept or not), so every process and every device draws the same
  directions, and ``keep_1d`` does not change the weights' directions.
- :func:`loss_surface` evaluates the probe loss on the line ``θ + α d1`` or the grid
  ``θ + α d1 + β d2`` with ``α, β`` in ``[-span, span]``.
- :func:`linear_interpolation` evaluates it on the straight line from the initial weights θ0 to
  θ; :attr:`Interpolation.barrier` is the largest loss on the line minus the larger endpoint.

The loss is the sample-weighted probe loss of a
:class:`~lightning_landscape.measures.operators.ProbeHessian`. Grid points are evaluated in
chunks of ``chunk_size``: each process sums ``n_b · ℓ_b`` over its probe batches for every point
of the chunk, and the chunk's sums are all-reduced *once* (one collective per chunk, not per
point), so under ``torch.distributed`` every rank holds the loss of the union of the probe
shards. An optional ``progress(done, total)`` is called after every chunk. The parameters are
overwritten by copying each point in and are copied back from a snapshot at the end (also on
error), so they are bit-identical afterwards; buffers, train/eval modes and RNG are the
caller's business (run inside :func:`~lightning_landscape.measures.guard.guard`).

Cost: one forward pass over the probe per grid point (no backward): ``resolution**dims + 1``
forward passes for a surface, ``resolution`` for an interpolation.

Example::

    >>> import torch
    >>> from lightning_landscape.measures.operators import ProbeHessian
    >>> from lightning_landscape.measures.probe import Probe
    >>> net = torch.nn.Linear(2, 1, bias=False).double()
    >>> x = torch.randn(8, 2, dtype=torch.float64)
    >>> probe = Probe.from_samples((x, torch.zeros(8, 1, dtype=torch.float64)), batch_size=3)
    >>> op = ProbeHessian(net, probe, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    >>> dirs = filter_normalized_directions(op.parameters, count=2, seed=0)
    >>> surface = loss_surface(op, dirs, resolution=5, span=1.0)
    >>> tuple(surface.losses.shape), surface.losses[2, 2].item() == surface.center
    ((5, 5), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_landscape.checks import check_int, check_number

from .operators import NonFiniteError, ProbeHessian, flatten

__all__ = [
    "Interpolation",
    "LossSurface",
    "Progress",
    "evaluate_points",
    "filter_normalize",
    "filter_normalized_directions",
    "grid_coordinates",
    "linear_interpolation",
    "loss_surface",
]

Progress = Callable[[int, int], None]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (no ε: the norms come out exact)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


@dataclass(frozen=True)
class LossSurface:
    """The probe loss around θ along one or two directions.

    Attributes:
        alphas: coordinates along the first direction, shape ``(resolution,)`` (float64).
        betas: coordinates along the second direction (``None`` on a 1-D line).
        losses: ``losses[i] = L(θ + α_i d1)`` (1-D), or ``losses[j, i] = L(θ + α_i d1 +
            β_j d2)`` (2-D: rows follow ``betas``, columns ``alphas``, as a contour plot takes
            them), float64 on the CPU.
        center: the loss at θ itself.
    """

    alphas: torch.Tensor
    betas: torch.Tensor | None
    losses: torch.Tensor
    center: float

    @property
    def dims(self) -> int:
        """1 for a line, 2 for a grid."""
        return 1 if self.betas is None else 2


@dataclass(frozen=True)
class Interpolation:
    """The probe loss on the straight line ``θ(t) = θ0 + t (θ − θ0)``, ``t ∈ [0, 1]``.

    Attributes:
        t: the line's coordinates, ``t[0] = 0`` (θ0) and ``t[-1] = 1`` (θ), float64.
        losses: the loss at each ``t``, float64 on the CPU.
    """

    t: torch.Tensor
    losses: torch.Tensor

    @property
    def barrier(self) -> float:
        """Largest loss on the line minus the larger of the two endpoints (``>= 0``)."""
        ends = max(float(self.losses[0]), float(self.losses[-1]))
        return float(self.losses.max()) - ends


def grid_coordinates(resolution: int, span: float) -> torch.Tensor:
    """``resolution`` evenly spaced float64 points on ``[-span, span]``, exactly antisymmetric
    (with an odd ``resolution`` the middle one is exactly 0).

    Example::

        >>> grid_coordinates(5, 1.0).tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    check_int("resolution", resolution, 2)
    check_number("span", span)
    c = torch.linspace(-float(span), float(span), resolution, dtype=torch.float64)
    return (c - c.flip(0)) / 2


def filter_normalize(
    direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, keep_1d: bool = False
) -> list[torch.Tensor]:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``params``.

    Args:
        direction: one tensor per parameter (not modified).
        params: the parameters θ, in the same order and shapes.
        keep_1d: keep 1-D/0-D parameters (rescaled as a whole to the parameter's norm) instead
            of zeroing them.

    Returns:
        The normalised direction, one tensor per parameter (same dtype/device as ``params``).
    """
    if len(direction) != len(params):
        raise ValueError(
            f"`direction` must hold one tensor per parameter ({len(params)}), got {len(direction)}"
        )
    out = []
    for d, p in zip(direction, params):
        if d.shape != p.shape:
            raise ValueError(
                f"`direction` shapes must match the parameters, got {tuple(d.shape)} for a "
                f"parameter of shape {tuple(p.shape)}"
            )
        d = d.detach().to(device=p.device, dtype=p.dtype)
        w = p.detach()
        if w.dim() <= 1:
            if not keep_1d:
                out.append(torch.zeros_like(w))
                continue
            out.append(d * _ratio(w.norm(), d.norm()))
            continue
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = _ratio(wn, dn).reshape(-1, *([1] * (w.dim() - 1)))
        out.append(d * scale)
    return out


def filter_normalized_directions(
    params: Sequence[torch.Tensor], *, count: int = 1, seed: int = 0, keep_1d: bool = False
) -> list[torch.Tensor]:
    """``count`` filter-normalised Gaussian directions, each flat in the order of ``params``.

    Directions are drawn one after another from one CPU generator seeded with ``seed`` (every
    parameter draws, kept or not), so they are identical on every rank and device.

    Args:
        params: the parameters θ (e.g. ``ProbeHessian.parameters``).
        count: number of directions (1 for a line, 2 for a surface).
        seed: seed of the generator.
        keep_1d: keep biases and other 1-D parameters (see :func:`filter_normalize`).
    """
    check_int("count", count, 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    if not params:
        raise ValueError("`params` must hold at least one parameter, got none")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        raw = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        out.append(flatten(filter_normalize(raw, params, keep_1d=keep_1d)))
    return out


def _local_loss(op: ProbeHessian) -> torch.Tensor:
    """``Σ_b n_b ℓ_b`` over this process's probe batches (float64, not yet reduced)."""
    total = torch.zeros((), dtype=torch.float64, device=op.device)
    for batch, n in op.probe.weighted():
        total += n * op.loss_fn(op.model, batch).detach().to(torch.float64)
    return total


def evaluate_points(
    op: ProbeHessian,
    point: Callable[[int], torch.Tensor],
    count: int,
    *,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The probe loss at ``point(0)``, …, ``point(count - 1)`` (flat parameter vectors).

    Points are copied into the parameters one at a time; each chunk of ``chunk_size`` points
    costs one all-reduce. The parameters are copied back from a snapshot afterwards.

    Returns:
        float64 losses on the CPU, one per point (non-finite values are kept as they are).
    """
    check_int("count", count, 1)
    check_int("chunk_size", chunk_size, 1)
    snapshot = op.vector()
    world = op.world_size
    losses = torch.empty(count, dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, count, chunk_size):
                stop = min(start + chunk_size, count)
                sums = torch.empty(stop - start, dtype=torch.float64, device=op.device)
                for i in range(start, stop):
                    op.set_vector(point(i))
                    sums[i - start] = _local_loss(op)
                if world > 1:
                    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=op.process_group)
                losses[start:stop] = (sums / op.num_samples).cpu()
                if progress is not None:
                    progress(stop, count)
    finally:
        op.set_vector(snapshot)
    return losses


def loss_surface(
    op: ProbeHessian,
    directions: Sequence[torch.Tensor],
    *,
    resolution: int = 21,
    span: float = 1.0,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> LossSurface:
    """The probe loss on ``θ + α d1`` (one direction) or ``θ + α d1 + β d2`` (two).

    Args:
        op: the probe loss (its current parameters are θ).
        directions: one or two flat directions (see :func:`filter_normalized_directions`).
        resolution: points per axis (``resolution**dims`` grid points).
        span: the axes run over ``[-span, span]``.
        chunk_size: grid points per all-reduce and per ``progress`` call.
        progress: called as ``progress(done, total)`` after every chunk (``total`` counts the
            extra evaluation at θ).

    Raises:
        NonFiniteError: if the loss at θ itself is not finite (on every rank alike).
    """
    if len(directions) not in (1, 2):
        raise ValueError(f"`directions` must hold 1 or 2 directions, got {len(directions)}")
    for d in directions:
        if d.shape != (op.size,):
            raise ValueError(f"`directions` must be flat of size {op.size}, got {tuple(d.shape)}")
    coords = grid_coordinates(resolution, span)
    theta = op.vector()
    dirs = [d.to(device=theta.device, dtype=theta.dtype) for d in directions]
    n = resolution
    total = n ** len(dirs) + 1

    def point(k: int) -> torch.Tensor:
        if k == 0:
            return theta  # θ itself, evaluated first: a broken model fails fast
        j, i = divmod(k - 1, n)
        x = theta.clone()
        if len(dirs) == 1:
            return x.add_(dirs[0], alpha=float(coords[k - 1]))
        return x.add_(dirs[0], alpha=float(coords[i])).add_(dirs[1], alpha=float(coords[j]))

    losses = evaluate_points(op, point, total, chunk_size=chunk_size, progress=progress)
    center = float(losses[0])
    if not math.isfinite(center):
        raise NonFiniteError("non-finite probe loss at the current parameters")
    grid = losses[1:] if len(dirs) == 1 else losses[1:].reshape(n, n)
    return LossSurface(coords, None if len(dirs) == 1 else coords.clone(), grid, center)


def linear_interpolation(
    op: ProbeHessian,
    start: torch.Tensor,
    *,
    resolution: int = 21,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> Interpolation:
    """The probe loss on the straight line from ``start`` (θ0) to the current parameters θ.

    Points are ``torch.lerp(θ0, θ, t)`` for ``resolution`` evenly spaced ``t`` in ``[0, 1]``,
    exact at both ends.

    Args:
        op: the probe loss (its current parameters are θ).
        start: θ0, flat in the operator's parameter order.
        resolution: number of points on the line, both ends included.
        chunk_size: points per all-reduce and per ``progress`` call.
        progress: called as ``progress(done, total)`` after every chunk.

    Raises:
        NonFiniteError: if the loss at θ is not finite.
    """
    check_int("resolution", resolution, 2)
    if start.shape != (op.size,):
        raise ValueError(f"`start` must be flat of size {op.size}, got {tuple(start.shape)}")
    theta = op.vector()
    theta0 = start.to(device=theta.device, dtype=theta.dtype)
    t = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)

    def point(k: int) -> torch.Tensor:
        return torch.lerp(theta0, theta, float(t[k]))

    losses = evaluate_points(op, point, resolution, chunk_size=chunk_size, progress=progress)
    if not math.isfinite(float(losses[-1])):
        raise NonFiniteError("non-finite probe loss at the current parameters")
    return Interpolation(t, losses)
