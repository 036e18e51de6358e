"""Extreme eigenvalues, trace and spectral density of a symmetric curvature operator.

:func:`top_eigen` returns the ``k`` *algebraically* largest eigenpairs (never the largest in
magnitude: a large negative eigenvalue is not sharpness), optionally also the smallest one, by
warm-started (band) Lanczos with full re-orthogonalisation (:mod:`.lanczos`). It stops once
every wanted Ritz value is within ``tol`` (relative) of an eigenvalue by an error bound: for a
Ritz vector that continues a warm direction, ``ρ²/δ`` (residual ``ρ = ‖Hv − θv‖``, gap ``δ``
to the neighbouring Ritz values less their residuals; ``ρ`` itself when the gap is not
resolved); for everything else (a cold start, a fresh or mixed direction) ``ρ`` — or after
``max_iter`` products.

Warm starting from the previous measurement's eigenvectors is what makes frequent measurement
affordable: between nearby training steps the top eigenvectors barely move, so a Krylov space
started from them converges in a handful of products instead of tens. A warm start alone is
blind to an eigenvalue that has *overtaken* the old top direction (the old vector may still be
an exact eigenvector, converged after one product). So the start holds the previous top
vectors *and the next Ritz vector* (the likeliest to overtake), plus a fresh random direction
of equal weight, and the solve grows the fresh direction for two Krylov dimensions before it
may stop (see :func:`top_eigen`). An eigenvalue arriving from the bulk, along a direction in
neither, is found only as fast as the fresh direction's Krylov growth allows.

Repeated eigenvalues: a Krylov space grown from a *single* vector holds one copy of a repeated
eigenvalue (the start vector has one component in the eigenspace), so with ``k = 1`` λ_max is
right but its multiplicity is invisible. For ``k > 1`` the Krylov space is grown from a block
of 2 start vectors (``block``), which finds up to 2 copies: ``eig_1 = eig_2`` is reported for a
doubly repeated top eigenvalue.

Trace (Hutch++) and spectral density (stochastic Lanczos quadrature) delegate to
hessian-eigenthings with a fixed seed, so every DDP rank draws the same vectors.

Example::

    >>> import torch
    >>> from lightning_landscape.measures._compat import LambdaOperator
    >>> A = torch.diag(torch.tensor([-9.0, 1.0, 2.0, 5.0], dtype=torch.float64))
    >>> op = LambdaOperator(lambda v: A @ v, size=4, dtype=torch.float64)
    >>> est = top_eigen(op, k=2, max_iter=4, tol=1e-10)
    >>> [round(x, 6) for x in est.eigenvalues.tolist()], round(est.lambda_min, 6)
    ([5.0, 2.0], -9.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_landscape.checks import check_int, check_number

from ._compat import (
    CurvatureOperator,
    LambdaOperator,
    hutch_plus_plus,
    spectral_density,
)
from .lanczos import FLOOR, band_lanczos, orthonormal_rows

__all__ = ["EigenEstimate", "Density", "Trace", "top_eigen", "hutchpp_trace", "slq_density"]

_TINY = 1e-30
#: weight of the fresh random direction in a single-vector (k = 1) warm start
NOISE = 1.0


@dataclass(frozen=True)
class EigenEstimate:
    """Result of :func:`top_eigen`.

    Attributes:
        eigenvalues: ``(k,)`` algebraically largest Ritz values, descending.
        eigenvectors: ``(k, n)`` unit Ritz vectors (rows), in the same order.
        residuals: ``(k,)`` relative residuals ``‖Hv − λv‖ / |λ|``.
        lambda_min: smallest Ritz value (the most negative curvature found).
        min_vector: its Ritz vector ``(n,)``.
        min_residual: its relative residual.
        matvecs: operator products spent.
        converged: whether every wanted pair reached ``tol`` (by its error bound).
        errors: ``(k,)`` eigenvalue-error bounds (``ρ²/δ`` or ``ρ``) relative to
            ``max(|λ|, 0.1 · max|λ|)``: what ``tol`` is compared with.
        min_error: the same for ``lambda_min``.
        next_vector: ``(n,)`` Ritz vector of the ``(k+1)``-th largest Ritz value (the
            closest competitor of the top k; ``None`` if the space had only ``k``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    lambda_min: float
    min_vector: torch.Tensor
    min_residual: float
    matvecs: int
    converged: bool
    errors: torch.Tensor | None = None
    min_error: float = math.nan
    next_vector: torch.Tensor | None = None

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def warm_start(self) -> torch.Tensor:
        """Vectors to start the next solve from: the top-k, the next and the bottom Ritz vector.

        The next one is there so that an eigenvalue overtaking the k-th between two solves is
        already in the next start; it is left out when there was none.
        """
        rows = [self.eigenvectors]
        if self.next_vector is not None:
            rows.append(self.next_vector.unsqueeze(0))
        return torch.cat(rows + [self.min_vector.unsqueeze(0)])


def _random_rows(count: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(count, n, dtype=torch.float64, generator=gen)


def _start_block(
    operator: CurvatureOperator,
    warm_start: torch.Tensor | None,
    k: int,
    bottom: bool,
    seed: int,
    noise: float,
    block: int,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The ``(block, n)`` start block, the fewest products before the solve may stop, and
    the orthonormal warm directions (``None`` cold).

    Warm rows used: the first ``k + 1`` (the previous top vectors and the next one) and, if
    ``bottom`` and there are more rows, the last one (the previous bottom vector, as in
    :meth:`EigenEstimate.warm_start`). Each start vector is a combination of all of them
    (signs drawn from ``seed``; the first one their plain sum) plus ``noise`` times a fresh
    random unit vector orthogonal to the warm directions.
    """
    n, dtype, device = operator.size, operator.dtype, operator.device
    block = min(block, n)
    rand = _random_rows(block, n, seed).to(device=device, dtype=dtype)
    warm = None
    if warm_start is not None and warm_start.numel() > 0:
        rows = warm_start.reshape(-1, n).to(device=device, dtype=dtype)
        rows = rows[torch.isfinite(rows).all(dim=1)]
        top = k + 1
        parts = [rows[:top]] + ([rows[-1:]] if bottom and rows.shape[0] > top else [])
        warm = orthonormal_rows(torch.cat(parts))
    if warm is None or warm.shape[0] == 0:
        return orthonormal_rows(rand), 2 * block, None
    p = warm.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    signs = torch.randint(0, 2, (block, p), generator=gen).double() * 2 - 1
    signs[0] = 1.0
    combos = signs.to(device=device, dtype=dtype) @ warm / math.sqrt(p)
    fresh = rand - (rand @ warm.T) @ warm  # orthogonal to the warm directions
    fresh = fresh / fresh.norm(dim=1, keepdim=True).clamp_min(_TINY)
    start = orthonormal_rows(combos + noise * fresh)
    # the warm directions take ~p products to separate; then 2 per start vector for the fresh
    return start, p + 2 * start.shape[0], warm


def top_eigen(
    operator: CurvatureOperator,
    *,
    k: int = 1,
    max_iter: int = 20,
    tol: float = 1e-3,
    min_iter: int = 1,
    warm_start: torch.Tensor | None = None,
    bottom: bool = False,
    seed: int = 0,
    noise: float = NOISE,
    block: int | None = None,
) -> EigenEstimate:
    """The ``k`` algebraically largest eigenpairs (and the smallest) by adaptive Lanczos.

    Start block (``block`` vectors, default ``min(k, 2)``): cold, seeded random vectors. Warm:
    the warm directions (the previous top ``k``, the next one and, with ``bottom``, the bottom
    one; see :meth:`EigenEstimate.warm_start`) are orthonormalised, and each start vector is
    a signed combination of all of them plus ``noise`` (default 1: comparable weight) times a
    fresh seeded random unit vector orthogonal to them. The solve never stops before
    ``p + 2·block`` products (``p`` warm directions, whatever ``min_iter`` says): the warm
    directions separate within about ``p`` products, and the fresh ones are grown for two
    Krylov dimensions per start vector, so that an eigenvalue that has overtaken the old top
    direction (which may still be an exact eigenvector, converged after one product) is
    looked for in new directions and not only in the old ones.

    Stopping: every wanted Ritz value's error bound, relative to ``max(|θ|, 0.1 · max|θ|)``,
    is at most ``tol``, and no other Ritz value's interval ``θ_j ± ρ_j`` reaches more than
    that beyond the wanted ones (the ordering is settled). The bound is
    (:func:`.lanczos.error_bounds`) ``ρ²/δ`` — residual ``ρ``, gap ``δ`` to the neighbouring
    Ritz values minus their residuals; ``ρ`` itself when ``δ ≤ ρ`` — for a Ritz vector with
    squared overlap ≥ 0.7 with one warm direction, and ``ρ`` for any other (cold starts, a
    vector from the fresh directions, or one mixing two warm directions at a crossing): there
    the eigenvalue it would be close to may not be the one it should be close to.

    Limitations: an eigenvalue whose eigenvector is (nearly) orthogonal to the start block
    is not seen, whatever the stopping rule (a fresh random direction holds about
    ``1/√n`` of it; its Krylov growth is what finds it). A Krylov space grown from a
    single vector holds one copy of a repeated eigenvalue, so with ``block = 1`` (the
    default for ``k = 1``) a repeated λ_max is found but its multiplicity is invisible;
    with ``block = b`` up to ``b`` copies are found (``k = 2`` returns both copies of a
    doubly repeated top eigenvalue). A larger block costs products (about +50 % per extra
    start vector on small nets).

    Args:
        operator: a symmetric operator (``matvec``, ``size``, ``dtype``, ``device``).
        k: number of top eigenpairs.
        max_iter: cap on operator products; at least ``k``.
        tol: stop when every wanted pair's relative eigenvalue-error bound is below this.
        min_iter: never stop before this many products.
        warm_start: ``(m, n)`` vectors from a previous solve: the top vectors in descending
            order first, the bottom one last (:meth:`EigenEstimate.warm_start`); the first
            ``k + 1`` rows are used, and the last one with ``bottom``. ``None``: cold.
        bottom: also require the smallest Ritz pair to converge (``lambda_min``).
        seed: seed of the random start vectors (identical on every rank).
        noise: weight of the fresh random direction in each warm start vector.
        block: number of start vectors (default ``min(k, 2)``).

    Returns:
        An :class:`EigenEstimate`.
    """
    check_int("k", k, 1)
    check_int("max_iter", max_iter, 1)
    check_int("min_iter", min_iter, 1)
    check_number("tol", tol, include_low=True)
    check_number("noise", noise, include_low=True)
    if block is not None:
        check_int("block", block, 1)
    n = operator.size
    if k > n:
        raise ValueError(f"`k` must not exceed the operator size {n}, got {k}")
    cap = min(max(max_iter, k), n)
    dtype, device = operator.dtype, operator.device
    size = block if block is not None else min(k, 2)
    start, least, warm = _start_block(operator, warm_start, k, bottom, seed, noise, size)
    kr = band_lanczos(
        operator,
        start,
        k=k,
        bottom=bottom,
        max_iter=cap,
        min_iter=min(max(min_iter, least), cap),
        tol=tol,
        anchor=warm,
    )
    theta, m = kr.theta, kr.matvecs
    desc = torch.argsort(theta, descending=True)
    order = desc[: min(k, m)]
    scale = max(float(theta.abs().max()), _TINY)
    rel = kr.residuals / theta.abs().clamp_min(1e-12 * scale)
    err = kr.bounds / theta.abs().clamp_min(FLOOR * scale)
    s_dev = kr.coefficients.to(device=device, dtype=dtype)
    lo = int(torch.argmin(theta))
    nxt = kr.basis.combine(s_dev[:, int(desc[k])]) if m > k + 1 else None
    return EigenEstimate(
        eigenvalues=theta[order].to(dtype),
        eigenvectors=kr.basis.combine(s_dev[:, order]),
        residuals=rel[order].to(dtype),
        lambda_min=float(theta[lo]),
        min_vector=kr.basis.combine(s_dev[:, lo]),
        min_residual=float(rel[lo]),
        matvecs=m,
        converged=kr.converged,
        errors=err[order].to(dtype),
        min_error=float(err[lo]),
        next_vector=nxt,
    )


@dataclass(frozen=True)
class Trace:
    """Hutch++ trace estimate and its standard error (of the residual part)."""

    estimate: float
    stderr: float
    matvecs: int


def hutchpp_trace(operator: CurvatureOperator, *, matvecs: int = 60, seed: int = 0) -> Trace:
    """Trace of ``operator`` by Hutch++ (Meyer et al., 2021) with a budget of ``matvecs``.

    hessian-eigenthings splits the budget into thirds of ``m = matvecs // 3``: ``m`` products
    for the sketch, one per column of its orthonormal basis — ``min(n, m)`` of them — and
    ``m`` for the residual. So fewer than ``3m`` products run when the operator size ``n`` is
    below ``m``; ``Trace.matvecs`` counts the products that actually ran.
    """
    check_int("matvecs", matvecs, 3)
    wrapped, calls = _counting(operator)
    result = hutch_plus_plus(wrapped, num_matvecs=matvecs, seed=seed)
    return Trace(float(result.estimate), float(result.stderr), calls[0])


def _counting(operator: CurvatureOperator) -> tuple[LambdaOperator, list[int]]:
    """``operator`` wrapped to count its products (the count is ``calls[0]``)."""
    calls = [0]

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return operator.matvec(v)

    wrapped = LambdaOperator(
        counted, size=operator.size, device=operator.device, dtype=operator.dtype
    )
    return wrapped, calls


@dataclass(frozen=True)
class Density:
    """Spectral density on a grid (integrates to about 1) by stochastic Lanczos quadrature."""

    grid: list[float]
    density: list[float]
    nodes: list[float]
    matvecs: int


def slq_density(
    operator: CurvatureOperator,
    *,
    runs: int = 4,
    lanczos_steps: int = 40,
    grid_points: int = 400,
    seed: int = 0,
) -> Density:
    """Eigenvalue density of ``operator`` by stochastic Lanczos quadrature (Ubaru et al.)."""
    check_int("runs", runs, 1)
    check_int("lanczos_steps", lanczos_steps, 2)
    steps = min(lanczos_steps, operator.size)
    # the library's default bandwidth is spread / steps; pad the grid by 4 bandwidths so the
    # Gaussian tails of the extreme nodes stay on it and the density integrates to ~1
    wrapped, calls = _counting(operator)
    result = spectral_density(
        wrapped,
        num_runs=runs,
        lanczos_steps=steps,
        num_grid_points=grid_points,
        grid_padding=max(0.1, 4.0 / steps),
        seed=seed,
    )
    nodes = result.raw_eigenvalues[~torch.isnan(result.raw_eigenvalues)]
    return Density(
        grid=result.grid.tolist(),
        density=result.density.tolist(),
        nodes=nodes.tolist(),
        matvecs=calls[0],  # runs × steps, less where a run's Krylov space became invariant
    )
