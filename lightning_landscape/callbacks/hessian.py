"""``HessianEigenvalues``: top-k eigenvalues, λ_min, trace, per-layer blocks, R_med, density."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_landscape import panels
from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.shared import SolveRequest
from lightning_landscape.checks import check_int, check_number, check_strings
from lightning_landscape.measures.diagonal import hutchinson_diagonal, rmed
from lightning_landscape.measures.eigen import (
    EigenEstimate,
    hutchpp_trace,
    slq_density,
    top_eigen,
)
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.operators import unflatten
from lightning_landscape.metrics import HESSIAN

__all__ = ["HessianEigenvalues", "parameter_modules"]


def parameter_modules(model: nn.Module) -> dict[str, list[str]]:
    """Modules that own trainable parameters directly → their full parameter names."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        own = [
            f"{name}.{p}" if name else p
            for p, t in module.named_parameters(recurse=False)
            if t.requires_grad
        ]
        if own:
            out[name] = own
    return out


class HessianEigenvalues(MeasurementCallback):
    """Log the Hessian's top-k eigenvalues on the probe, and optionally more of its spectrum.

    Logged under ``landscape/hessian/``: ``eig_1`` … ``eig_k`` (algebraically largest,
    descending), ``lambda_min`` (most negative curvature), ``residual`` (largest relative
    residual ``‖Hv − λv‖/|λ|`` of the k pairs), ``lambda_min_residual`` (the same for
    ``lambda_min``); with ``trace=True`` ``trace`` (Hutch++, ``trace_matvecs``
    HVPs); with ``per_layer`` ``<module>/eig_1`` (λ_max of that module's Hessian block, other
    parameters held fixed); with ``rmed=True`` ``rmed/<module>`` (max/median of the absolute
    Hutchinson diagonal of the module's block, ``rmed_samples`` HVPs); with
    ``density_every_n_steps`` a spectral-density figure (stochastic Lanczos quadrature,
    ``density_runs × density_steps`` HVPs) under ``landscape/hessian/density``.

    When ``Sharpness`` measures at the same step with the same probe, the top-k solve is shared.
    The solve iterates until all k pairs *and* ``lambda_min`` have a relative eigenvalue-error
    bound below ``tol`` (:func:`~lightning_landscape.measures.eigen.top_eigen`), up to
    ``max_iter`` products; when the cap stops it first, one warning says so (the residuals are
    logged at every step). With ``k ≥ 2`` the Krylov space grows from a block of 2 vectors,
    so a doubly repeated eigenvalue shows as ``eig_i = eig_{i+1}``; higher multiplicities show
    at most twice (single-vector Lanczos would show every repeated eigenvalue once).

    Args:
        k: number of top eigenvalues.
        max_iter: cap on HVPs of the top-k solve (default ``max(40, 12 (k + 1))``: the k
            pairs and ``lambda_min`` take 8–12 products each in a cold solve of a clustered
            spectrum — 39–61 for k = 5 on a tiny CNN and MLP; warm-started solves stop well
            before, 28–45 there).
        tol: relative eigenvalue-error bound at which the solve stops (all k pairs and
            ``lambda_min``; an eigenvalue below 0.1 ``eig_1`` in magnitude is resolved to
            ``0.1 tol eig_1``).
        trace: estimate the trace.
        trace_matvecs: HVPs spent on the trace.
        density_every_n_steps: draw the density at a measured step once this many steps have
            passed since the last one (``None``: never).
        density_runs: SLQ runs. density_steps: Lanczos steps per run.
        per_layer: ``True`` for every module owning parameters, or a list of module names.
        rmed: log R_med per module. rmed_samples: Hutchinson samples for the diagonal.
        every_n_steps, schedule, max_overhead, probe_size, probe_batch_size, probe_dataloader,
        bn, dropout, seed, name, strict: as in :class:`~lightning_landscape.callbacks.Sharpness`.

    Example::

        >>> HessianEigenvalues(k=0)
        Traceback (most recent call last):
        ...
        ValueError: `k` must be a positive integer, got 0
    """

    family = "hessian"
    metrics = HESSIAN

    def __init__(
        self,
        *,
        k: int = 5,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float = 0.025,
        probe_size: int | Literal["auto"] = "auto",
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        max_iter: int | None = None,
        tol: float = 1e-3,
        trace: bool = False,
        trace_matvecs: int = 60,
        density_every_n_steps: int | None = None,
        density_runs: int = 4,
        density_steps: int = 40,
        per_layer: bool | Sequence[str] = False,
        rmed: bool = False,
        rmed_samples: int = 20,
        bn: BNMode = "eval",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(ProbeOptions.pick(locals()))
        check_int("k", k)
        check_int("max_iter", max_iter, none=True)
        check_int("trace_matvecs", trace_matvecs, 3)
        check_int("density_every_n_steps", density_every_n_steps, none=True)
        check_int("density_runs", density_runs)
        check_int("density_steps", density_steps, 2)
        check_int("rmed_samples", rmed_samples)
        check_number("tol", tol)
        if not isinstance(per_layer, bool):
            check_strings(
                "per_layer", per_layer, what="a bool or a list of module names", empty=True
            )
        self.k = k
        self.max_iter = max_iter if max_iter is not None else max(40, 12 * (k + 1))
        self.tol = float(tol)
        self.trace = bool(trace)
        self.trace_matvecs = trace_matvecs
        self.density_every_n_steps = density_every_n_steps
        self.density_runs = density_runs
        self.density_steps = density_steps
        self.per_layer = per_layer if isinstance(per_layer, bool) else list(per_layer)
        self.rmed = bool(rmed)
        self.rmed_samples = rmed_samples
        self._last_density_step: int | None = None

    @override
    def solve_request(self) -> SolveRequest:
        return SolveRequest(k=self.k, max_iter=self.max_iter, tol=self.tol, bottom=True)

    def _check_converged(self, est: EigenEstimate) -> None:
        """Warn (once) when the solve stopped at its cap before this callback's tolerance."""
        if est.errors is None:
            done = est.converged
        else:
            done = bool((est.errors[: self.k] <= self.tol).all()) and est.min_error <= self.tol
        if not done:
            self.warn_once(
                f"HessianEigenvalues: the top-{self.k} solve hit its cap of {self.max_iter} "
                f"HVPs before all eigenvalues and lambda_min reached tol={self.tol:g}; see "
                "landscape/hessian/residual and lambda_min_residual (raise `max_iter` or "
                "`tol`). Warned once."
            )

    def _modules(self, model: nn.Module) -> dict[str, list[str]]:
        owners = parameter_modules(model)
        if isinstance(self.per_layer, list):
            unknown = [n for n in self.per_layer if n not in owners]
            if unknown:
                raise ValueError(
                    f"`per_layer` names modules without trainable parameters or unknown: {unknown}"
                )
            return {n: owners[n] for n in self.per_layer}
        return owners

    @override
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        est = ctx.top_k(self.solve_request())
        out = {f"eig_{i + 1}": float(v) for i, v in enumerate(est.eigenvalues[: self.k])}
        out["lambda_min"] = est.lambda_min
        out["residual"] = float(est.residuals[: self.k].max())
        out["lambda_min_residual"] = float(est.min_residual)
        self._check_converged(est)
        op = ctx.operator()
        if self.trace:
            out["trace"] = hutchpp_trace(op, matvecs=self.trace_matvecs, seed=self.seed).estimate
        modules = self._modules(ctx.pl_module) if (self.per_layer or self.rmed) else {}
        if self.per_layer:
            for name, params in modules.items():
                block = top_eigen(
                    ctx.operator(params),
                    k=1,
                    max_iter=self.max_iter,
                    tol=self.tol,
                    warm_start=self.vectors.get(f"layer/{name}"),
                    seed=self.seed,
                )
                self.vectors[f"layer/{name}"] = block.eigenvectors.detach().cpu()
                out[f"{name}/eig_1"] = block.lambda_max
        if self.rmed:
            diag = hutchinson_diagonal(op, samples=self.rmed_samples, seed=self.seed)
            per_param = dict(zip(op.names, unflatten(diag, op.parameters)))
            for name, params in modules.items():
                values = [per_param[p].reshape(-1) for p in params]
                out[f"rmed/{name}"] = rmed(torch.cat(values))
        if self.density_every_n_steps is not None and (
            self._last_density_step is None
            or ctx.step - self._last_density_step >= self.density_every_n_steps
        ):
            self._last_density_step = ctx.step
            dens = slq_density(
                op, runs=self.density_runs, lanczos_steps=self.density_steps, seed=self.seed
            )
            fig = panels.density_figure(
                dens.grid,
                dens.density,
                est.eigenvalues.tolist(),
                title=f"Hessian spectrum, step {ctx.step}",
            )
            panels.log_figure(ctx.trainer, self.tag("density"), fig, ctx.step)
            # the same density as data, for the Landscape tab's heatmap over steps
            payload = {
                "grid": [float(g) for g in dens.grid],
                "density": [float(d) for d in dens.density],
            }
            panels.log_data(ctx.trainer, self.tag("density_data"), payload, ctx.step)
        return out
