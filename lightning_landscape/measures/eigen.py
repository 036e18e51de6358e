"""Extreme eigenvalues, trace and spectral density of a symmetric curvature operator.

:func:`top_eigen` is a warm-started Lanczos iteration with full re-orthogonalisation that
returns the ``k`` *algebraically* largest eigenpairs (never the largest in magnitude: a large
negative eigenvalue is not sharpness), optionally also the smallest one. It stops as soon as
every wanted Ritz pair has a relative residual ``‖Hv − λv‖ / |λ|`` below ``tol`` (read off the
tridiagonal matrix for free: ``β_m |s_{m,i}|``), or after ``max_iter`` products.

Warm starting from the previous measurement's eigenvectors is what makes frequent measurement
affordable: between nearby training steps the top eigenvectors barely move, so a Krylov space
started from them converges in a handful of products instead of tens.

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

from dataclasses import dataclass

import torch

from ._compat import (
    CurvatureOperator,
    hutch_plus_plus,
    spectral_density,
)

__all__ = ["EigenEstimate", "Density", "Trace", "top_eigen", "hutchpp_trace", "slq_density"]

_TINY = 1e-30


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
        converged: whether every wanted pair reached ``tol``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    lambda_min: float
    min_vector: torch.Tensor
    min_residual: float
    matvecs: int
    converged: bool

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def warm_start(self) -> torch.Tensor:
        """Vectors to start the next solve from: the top-k and the bottom Ritz vector."""
        return torch.cat([self.eigenvectors, self.min_vector.unsqueeze(0)])


def _start_vector(
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    warm_start: torch.Tensor | None,
    seed: int,
    noise: float,
) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = torch.randn(n, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
    rand /= rand.norm()
    if warm_start is None or warm_start.numel() == 0:
        return rand
    ws = warm_start.reshape(-1, n).to(device=device, dtype=dtype)
    ws = ws / ws.norm(dim=1, keepdim=True).clamp_min(_TINY)
    v = ws.sum(0)
    v = v / v.norm().clamp_min(_TINY)
    return v + noise * rand


def _check(name: str, value: object, lo: float, integer: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if integer and not isinstance(value, int):
        bad = True
    if bad or value < lo:  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind} >= {lo}, got {value!r}")


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
    noise: float = 1e-3,
) -> EigenEstimate:
    """The ``k`` algebraically largest eigenpairs (and the smallest) by adaptive Lanczos.

    Args:
        operator: a symmetric operator (``matvec``, ``size``, ``dtype``, ``device``).
        k: number of top eigenpairs.
        max_iter: cap on operator products (the Krylov dimension); at least ``k``.
        tol: stop when every wanted pair's relative residual is below this.
        min_iter: never stop before this many products.
        warm_start: ``(m, n)`` vectors from a previous solve; the Krylov space starts at their
            normalised sum plus ``noise`` times a seeded random unit vector (so directions that
            newly become dominant are still found). ``None``: a seeded random start.
        bottom: also require the smallest Ritz pair to converge (``lambda_min``).
        seed: seed of the random start vector (identical on every rank).
        noise: weight of the random component in a warm start.

    Returns:
        An :class:`EigenEstimate`.
    """
    _check("k", k, 1, integer=True)
    _check("max_iter", max_iter, 1, integer=True)
    _check("min_iter", min_iter, 1, integer=True)
    _check("tol", tol, 0.0)
    n = operator.size
    if k > n:
        raise ValueError(f"`k` must not exceed the operator size {n}, got {k}")
    max_iter = min(max(max_iter, k), n)
    dtype, device = operator.dtype, operator.device

    q = _start_vector(n, dtype, device, warm_start, seed, noise)
    basis = torch.empty(max_iter, n, dtype=dtype, device=device)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    theta = s = None
    beta = 0.0
    m = 0
    for j in range(max_iter):
        m = j + 1
        w = operator.matvec(basis[j])
        alpha = float(torch.dot(basis[j], w))
        alphas.append(alpha)
        # full re-orthogonalisation, twice (classical Gram-Schmidt is unstable once)
        for _ in range(2):
            w = w - basis[:m].T @ (basis[:m] @ w)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(tri)
        scale = max(float(theta.abs().max()), _TINY)
        res = beta * s[-1].abs() / theta.abs().clamp_min(1e-12 * scale)
        want = res[-min(k, m) :]
        ok = m >= k and bool((want < tol).all()) and (not bottom or float(res[0]) < tol)
        if beta <= 1e-12 * scale:  # invariant subspace: the Ritz pairs are exact
            converged = m >= k
            break
        if ok and m >= min_iter:
            converged = True
            break
        if m < max_iter:
            betas.append(beta)
            basis[m] = w / beta
    assert theta is not None and s is not None
    order = torch.argsort(theta, descending=True)[: min(k, m)]
    scale = max(float(theta.abs().max()), _TINY)
    rel = beta * s[-1].abs() / theta.abs().clamp_min(1e-12 * scale)
    s_dev = s.to(device=device, dtype=dtype)
    vectors = s_dev[:, order].T @ basis[:m]
    lo = int(torch.argmin(theta))
    return EigenEstimate(
        eigenvalues=theta[order].to(dtype),
        eigenvectors=vectors,
        residuals=rel[order].to(dtype),
        lambda_min=float(theta[lo]),
        min_vector=s_dev[:, lo] @ basis[:m],
        min_residual=float(rel[lo]),
        matvecs=m,
        converged=converged,
    )


@dataclass(frozen=True)
class Trace:
    """Hutch++ trace estimate and its standard error (of the residual part)."""

    estimate: float
    stderr: float
    matvecs: int


def hutchpp_trace(operator: CurvatureOperator, *, matvecs: int = 60, seed: int = 0) -> Trace:
    """Trace of ``operator`` by Hutch++ (Meyer et al., 2021) with ``matvecs`` products."""
    _check("matvecs", matvecs, 3, integer=True)
    result = hutch_plus_plus(operator, num_matvecs=matvecs, seed=seed)
    return Trace(float(result.estimate), float(result.stderr), 3 * max(1, matvecs // 3))


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
    _check("runs", runs, 1, integer=True)
    _check("lanczos_steps", lanczos_steps, 2, integer=True)
    steps = min(lanczos_steps, operator.size)
    # the library's default bandwidth is spread / steps; pad the grid by 4 bandwidths so the
    # Gaussian tails of the extreme nodes stay on it and the density integrates to ~1
    result = spectral_density(
        operator,
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
        matvecs=runs * steps,
    )
