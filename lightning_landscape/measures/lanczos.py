"""Band (block) Lanczos with full re-orthogonalisation and an eigenvalue-error stopping rule.

The core of :func:`~lightning_landscape.measures.eigen.top_eigen`. The Krylov space is started
from a *block* of ``b`` orthonormal vectors and grown one operator product at a time (the band
Lanczos order: the basis vectors are multiplied in turn, each product is orthogonalised against
the whole basis, twice, and its remainder becomes a new basis vector). With ``b = 1`` this is
plain Lanczos. A block is what lets the Krylov space hold several copies of a repeated
eigenvalue: a single start vector has one component in an eigenspace, so single-vector Lanczos
sees one copy of a repeated eigenvalue, however long it runs (in exact arithmetic).

After ``m`` products the Ritz pairs come from the ``m × m`` projection ``T`` of the operator on
the multiplied basis vectors, and the residual of a Ritz pair ``(θ, y = Q s)`` is read off for
free: ``‖Hy − θy‖ = ‖E s‖`` with ``E`` the coefficients of the products on the basis vectors
not yet multiplied (``β_m |s_m|`` for ``b = 1``).

Stopping rule (:func:`error_bounds`): a Ritz value with residual ``ρ`` whose nearest other
eigenvalue is at distance ``δ`` is within ``ρ²/δ`` of an eigenvalue (Kato–Temple), much less
than ``ρ`` once ``ρ ≪ δ``. The distance is estimated from the neighbouring Ritz values,
``δ ≈ |θ − θ_j| − ρ_j`` (the eigenvalue attached to ``θ_j`` is within ``ρ_j`` of it); when that
estimate is not above ``ρ`` (an unresolved gap, e.g. a cluster or a repeated eigenvalue) the bound
falls back to ``ρ`` itself. The solve stops when every wanted pair's bound, relative to
``max(|θ|, floor · max|θ|)``, is below ``tol``, and never before ``min_iter`` products.

The bound is only as good as the Krylov space: an eigenvalue whose eigenvector has (almost) no
component in the start block is invisible to the Ritz values and to the gap estimate alike.
That is why warm starts always carry fresh random directions, why ``min_iter`` exists, and why
the quadratic bound is only trusted for a Ritz vector *anchored* to one warm direction
(``anchor``): a cold start, or a Ritz vector that mixes two warm directions (two eigenvalues
crossing, not yet told apart) or comes from the fresh directions, stops on ``ρ`` instead.

The basis is stored in chunks of 16 vectors, allocated as the solve grows: memory follows
the products actually spent, not the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._compat import CurvatureOperator

__all__ = ["FLOOR", "Basis", "KrylovResult", "band_lanczos", "error_bounds", "orthonormal_rows"]

_TINY = 1e-30
#: bounds are relative to max(|θ|, FLOOR · max|θ|): eigenvalues near zero to FLOOR · tol of
#: the spectral scale
FLOOR = 0.1
#: the quadratic bound is trusted for a Ritz vector whose squared overlap with one warm
#: direction is at least this (the other ≤ 0.3)
ANCHOR = 0.7
_CHUNK = 16


class Basis:
    """Orthonormal rows stored in chunks of ``_CHUNK`` (allocated as needed)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.dtype, self.device = n, dtype, device
        self.chunks: list[torch.Tensor] = []
        self.size = 0

    def append(self, v: torch.Tensor) -> None:
        if self.size % _CHUNK == 0:
            self.chunks.append(torch.empty(_CHUNK, self.n, dtype=self.dtype, device=self.device))
        self.chunks[-1][self.size % _CHUNK] = v
        self.size += 1

    def row(self, i: int) -> torch.Tensor:
        return self.chunks[i // _CHUNK][i % _CHUNK]

    def _parts(self, rows: int) -> list[tuple[torch.Tensor, slice]]:
        out = []
        for j, chunk in enumerate(self.chunks):
            lo = j * _CHUNK
            if lo >= rows:
                break
            hi = min(rows, lo + _CHUNK)
            out.append((chunk[: hi - lo], slice(lo, hi)))
        return out

    def dots(self, w: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``Q[:rows] @ w``."""
        parts = self._parts(self.size if rows is None else rows)
        return torch.cat([c @ w for c, _ in parts])

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef.T @ Q[:len(coef)]`` for ``coef`` of shape ``(rows,)`` or ``(rows, r)``."""
        coef = coef.to(device=self.device, dtype=self.dtype)
        out = None
        for c, sl in self._parts(coef.shape[0]):
            term = (coef[sl].T if coef.dim() == 2 else coef[sl]) @ c
            out = term if out is None else out + term
        assert out is not None
        return out


@dataclass(frozen=True)
class KrylovResult:
    """Ritz pairs of a band Lanczos run (float64 on the CPU, ascending ``theta``)."""

    theta: torch.Tensor  # (m,)
    coefficients: torch.Tensor  # (m, m): Ritz vector i = basis.combine(coefficients[:, i])
    basis: Basis  # the first m rows are the multiplied basis vectors
    residuals: torch.Tensor  # (m,) absolute ‖Hy − θy‖
    bounds: torch.Tensor  # (m,) absolute eigenvalue-error bounds
    anchors: torch.Tensor  # (m,) each Ritz vector's best squared overlap with one anchor row
    matvecs: int
    converged: bool


def orthonormal_rows(rows: torch.Tensor, drop: float = 1e-6) -> torch.Tensor:
    """Gram–Schmidt (twice) over the rows, in order, dropping those (nearly) in the span."""
    kept: list[torch.Tensor] = []
    for v in rows:
        norm0 = float(v.norm())
        if norm0 <= _TINY:
            continue
        v = v / norm0
        for _ in range(2):
            for u in kept:
                v = v - torch.dot(u, v) * u
        norm = float(v.norm())
        if norm > drop:
            kept.append(v / norm)
    return torch.stack(kept) if kept else rows[:0]


def error_bounds(theta: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """Eigenvalue-error bound of each Ritz value: ``ρ²/δ`` if the gap ``δ`` is resolved, else ρ.

    ``theta`` ascending; ``δ_i = min_j (|θ_i − θ_j| − ρ_j)`` over the neighbours ``j = i ± 1``.
    """
    m = theta.numel()
    gap = torch.full_like(theta, -1.0)
    if m > 1:
        d = theta[1:] - theta[:-1]
        below = torch.full_like(theta, float("inf"))
        above = torch.full_like(theta, float("inf"))
        below[1:] = d - residuals[:-1]
        above[:-1] = d - residuals[1:]
        gap = torch.minimum(below, above)
    resolved = gap > residuals
    return torch.where(
        resolved, residuals.square() / gap.clamp_min(_TINY), residuals.clone()
    ).clamp_max(residuals)


def _converged(
    theta: torch.Tensor,
    res: torch.Tensor,
    bounds: torch.Tensor,
    k: int,
    bottom: bool,
    tol: float,
    floor: float,
) -> bool:
    """Every wanted bound below ``tol`` and the wanted set settled (see :func:`band_lanczos`)."""
    m = theta.numel()
    top = max(float(theta.abs().max()), _TINY)
    denom = theta.abs().clamp_min(floor * top)
    rel = bounds / denom
    if not bool((rel[m - k :] <= tol).all()) or (bottom and float(rel[0]) > tol):
        return False
    # no unwanted Ritz value may hide an eigenvalue beyond the wanted ones: the interval
    # [θ_j − ρ_j, θ_j + ρ_j] holds an eigenvalue, which must not exceed θ_k by more than tol
    lo = 1 if bottom else 0
    rest = slice(lo, m - k)
    if m - k > lo:
        high = float(theta[m - k] + tol * denom[m - k])
        if float((theta[rest] + res[rest]).max()) > high:
            return False
        if bottom and float((theta[rest] - res[rest]).min()) < float(theta[0] - tol * denom[0]):
            return False
    return True


def band_lanczos(
    operator: CurvatureOperator,
    start: torch.Tensor,
    *,
    k: int,
    bottom: bool,
    max_iter: int,
    min_iter: int,
    tol: float,
    floor: float = FLOOR,
    anchor: torch.Tensor | None = None,
) -> KrylovResult:
    """Band Lanczos from the orthonormal rows of ``start`` until the wanted pairs converge.

    Wanted: the ``k`` largest Ritz values, and the smallest if ``bottom``. ``max_iter`` caps
    the products (it is also capped by the operator size); ``floor``: the relative bounds are
    taken against ``max(|θ|, floor · max|θ|)`` so that an eigenvalue near zero is resolved to
    ``tol · floor`` of the spectral scale rather than chased to full relative accuracy.

    ``anchor``: orthonormal rows (the warm directions). The quadratic bound ``ρ²/δ`` is used
    only for a Ritz vector whose squared overlap with one of them is at least ``ANCHOR``
    (it continues a direction known to be an eigenvector nearby); every other one — all of
    them for a cold start — must meet ``tol`` with its residual ``ρ``. Why: a Ritz value
    converging to the second eigenvalue while the first is still invisible (its component in
    a random start is ``~1/√n``) has a small ``ρ²/δ`` long before its residual is small, and
    so has a Ritz vector mixing two warm directions whose eigenvalues are within the Krylov
    space's resolution (a crossing); the residual rule grows the space until they show.
    """
    n = operator.size
    dtype, device = operator.dtype, operator.device
    b = start.shape[0]
    cap = max(1, min(max_iter, n))
    basis = Basis(n, dtype, device)
    for v in start.to(device=device, dtype=dtype):
        basis.append(v)
    coef = torch.zeros(cap + b, cap, dtype=torch.float64)
    ref = None if anchor is None else anchor.to(device=device, dtype=dtype)
    inside = torch.zeros(0 if ref is None else ref.shape[0], cap + b, dtype=torch.float64)
    if ref is not None:
        inside[:, :b] = (ref @ start.to(device=device, dtype=dtype).T).double().cpu()
    size = b
    eps = max(1e-12, 8 * torch.finfo(dtype).eps)
    scale = 0.0
    m = 0
    ok = False
    theta = s = res = bounds = anchors = torch.zeros(0, dtype=torch.float64)
    while m < cap and m < size:
        w = operator.matvec(basis.row(m))
        hq_norm = float(w.norm())
        c = torch.zeros(size, dtype=torch.float64)
        for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough")
            proj = basis.dots(w)
            w = w - basis.combine(proj)
            c += proj.double().cpu()
        beta = float(w.norm())
        coef[:size, m] = c
        scale = max(scale, hq_norm)
        if beta > eps * scale and size < cap + b:
            basis.append(w / beta)
            coef[size, m] = beta
            if ref is not None:
                inside[:, size] = (ref @ basis.row(size)).double().cpu()
            size += 1
        m += 1
        t = coef[:m, :m]
        theta, s = torch.linalg.eigh(0.5 * (t + t.T))
        res = (coef[m:size, :m] @ s).norm(dim=0)
        anchors = (inside[:, :m] @ s).square().amax(0) if ref is not None else res * 0
        bounds = torch.where(anchors >= ANCHOR, error_bounds(theta, res), res)
        ok = m >= k and _converged(theta, res, bounds, k, bottom, tol, floor)
        if m >= size:  # invariant subspace: the Ritz pairs are exact
            ok = m >= k
            break
        if ok and m >= min_iter:
            break
    return KrylovResult(
        theta=theta,
        coefficients=s,
        basis=basis,
        residuals=res,
        bounds=bounds,
        anchors=anchors,
        matvecs=m,
        converged=ok,
    )
