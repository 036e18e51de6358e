"""``Sharpness``: λ_max against the stability threshold of the optimizer that is running."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.shared import SolveRequest
from lightning_landscape.checks import check_choice, check_int, check_number
from lightning_landscape.measures._compat import CurvatureOperator
from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.operators import flatten, unflatten
from lightning_landscape.measures.sharpness import preconditioned_lambda_max, rho_sharpness
from lightning_landscape.measures.shifted import (
    ShiftedOperator,
    constant_shift,
    decay_vector,
    shifted_preconditioned,
)
from lightning_landscape.metrics import SHARPNESS
from lightning_landscape.optim.profile import profile_for

__all__ = ["Sharpness"]


class Sharpness(MeasurementCallback):
    """Log the probe loss's sharpness and where it stands against the optimizer's threshold.

    Logged under ``landscape/sharpness/``: ``lambda_max`` (largest algebraic Hessian
    eigenvalue, warm-started Lanczos), ``residual`` (its ``‖Hv − λv‖/|λ|``), ``threshold`` (the
    stability threshold of ``trainer.optimizers[0]``, from
    :mod:`lightning_landscape.optim.stability`), ``preconditioned`` (λ_max(P^{-1/2} H P^{-1/2})
    for preconditioned optimizers: diagonal such as Adam, or K-FAC's Kronecker blocks when a
    :class:`~lightning_landscape.callbacks.kfac.KFAC` callback drives the optimizer), ``ratio`` (``preconditioned`` — or
    ``lambda_max`` for unpreconditioned optimizers — divided by ``threshold``), ``rho``
    (ρ-sharpness when ``rho`` is set) and ``skipped``. ``ratio`` also shows in the progress bar.

    Coupled (L2) weight decay — added to the gradient, as in ``SGD``, ``Adam``, ``RSG``,
    ``ARSG``, ``NovoGrad`` (per param group: the diagonal ``D`` of
    :attr:`~lightning_landscape.optim.stability.Stability.coupled_decay`) — makes the dynamics
    follow ``H + D``: ``preconditioned`` is then ``λ_max(P^{-1/2} (H + D) P^{-1/2})`` (``S (H + D)
    S`` with a non-diagonal ``S = P^{-1/2}``) and the plain ``ratio`` uses ``λ_max(H + D)``
    (``lambda_max + wd`` when ``D = wd·I``, else one more warm-started solve). ``lambda_max``
    stays the loss's own. Decoupled decay (``AdamW``) is left out: it scales ``θ`` by
    ``1 − η·wd`` outside the gradient (see :mod:`lightning_landscape.optim.stability`).

    Cost per measurement: the λ_max solve (1 HVP per Lanczos step on the probe; in steady state
    a warm-started solve needs a few), the same again for ``preconditioned`` (or for a plain
    ``ratio`` with per-group decays), and ``rho_steps`` probe gradients for ``rho``.

    Args:
        every_n_steps: measure every N optimizer steps (instead of the time budget).
        schedule: ``step -> bool`` deciding the measured steps (instead of the time budget).
        max_overhead: share of training wall time this callback may spend (default cadence).
        probe_size: global number of probe samples (each DDP rank holds its share).
        probe_batch_size: largest probe batch.
        probe_dataloader: take the probe from this loader instead of the training loader
            (under DDP it should yield the rank's own shard).
        max_iter: cap on Lanczos steps per solve.
        tol: relative residual at which a solve stops.
        preconditioned: ``"auto"`` measures the preconditioned sharpness when the optimizer is
            diagonally preconditioned; ``True`` warns when it cannot; ``False`` never does.
        rho: radius of the ρ-sharpness ball (``None``: not measured).
        rho_steps: projected-ascent steps of ρ-sharpness.
        adaptive: adaptive ρ-sharpness (ball in ``δ/(|θ| + adaptive_offset)`` coordinates).
        adaptive_offset: the offset ``c`` of adaptive ρ-sharpness.
        bn: ``"eval"`` (running statistics) or ``"batch"`` (probe-batch statistics).
        dropout: keep dropout active while measuring.
        seed: seed of the random vectors (identical on all ranks).
        name: the instance's tag segment: metrics go to ``landscape/<name>/...`` (default
            ``"sharpness"``); give two instances different names (e.g. ``name="heldout"``
            with its own ``probe_dataloader``).
        strict: re-raise an exception inside a measurement instead of skipping it.
        progress_bar: show ``ratio`` (or ``lambda_max``) in the progress bar.
        settle_steps: for preconditioned optimizers ``preconditioned`` and ``ratio`` are not
            taken before this many optimizer steps: ``P`` is read from the optimizer's state
            (Adam's second moments and their bias correction), which is absent at step 0 and
            dominated by the first few gradients after it (``lambda_max`` and ``threshold`` are
            logged from step 0).

    Example::

        >>> cb = Sharpness(every_n_steps=50, rho=0.05)
        >>> Sharpness(tol=-1)
        Traceback (most recent call last):
        ...
        ValueError: `tol` must be a positive finite number, got -1
    """

    family = "sharpness"
    metrics = SHARPNESS

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float = 0.025,
        probe_size: int | Literal["auto"] = "auto",
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        max_iter: int = 20,
        tol: float = 1e-3,
        preconditioned: bool | Literal["auto"] = "auto",
        rho: float | None = None,
        rho_steps: int = 5,
        adaptive: bool = False,
        adaptive_offset: float = 0.01,
        bn: BNMode = "eval",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
        progress_bar: bool = True,
        settle_steps: int = 10,
    ) -> None:
        super().__init__(ProbeOptions.pick(locals()))
        check_int("max_iter", max_iter)
        check_number("tol", tol)
        check_choice("preconditioned", preconditioned, ("auto", True, False))
        check_number("rho", rho, none=True)
        check_int("rho_steps", rho_steps)
        check_number("adaptive_offset", adaptive_offset, include_low=True)
        check_int("settle_steps", settle_steps, 0)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.preconditioned = preconditioned
        self.rho = rho
        self.rho_steps = rho_steps
        self.adaptive = bool(adaptive)
        self.adaptive_offset = float(adaptive_offset)
        self.progress_bar = bool(progress_bar)
        self.settle_steps = settle_steps

    @override
    def solve_request(self) -> SolveRequest:
        return SolveRequest(k=1, max_iter=self.max_iter, tol=self.tol)

    @override
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        op = ctx.operator()
        est = ctx.top_k(self.solve_request())
        out = {"lambda_max": est.lambda_max, "residual": float(est.residuals[0])}
        opt = ctx.optimizer
        profile = None if opt is None else profile_for(opt)
        stab = None if opt is None or profile is None else profile.stability(opt, op.parameters)

        # coupled (L2) weight decay D: the dynamics follow H + D, the loss's H is est's
        decay = None if stab is None else decay_vector(stab.coupled_decay, op)

        def top(key: str, operator: CurvatureOperator, warm: torch.Tensor | None) -> float:
            res = top_eigen(
                operator, k=1, max_iter=self.max_iter, tol=self.tol,
                warm_start=self.vectors.get(key, warm), seed=self.seed,
            )  # fmt: skip
            self.vectors[key] = res.eigenvectors.detach().cpu()
            return res.lambda_max

        def pre_sharpness(p: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> float:
            """λ_max(P^-1/2 (H + D) P^-1/2), ``p`` the flat ``P`` or ``v ↦ P^-1/2 v``; with
            ``decay_after_preconditioning`` (K-FAC) λ_max(P^-1/2 H P^-1/2 + D)."""
            if decay is not None and stab is not None and stab.decay_after_preconditioning:
                plain = shifted_preconditioned(op, None, p)
                return top("preconditioned", ShiftedOperator(plain, decay), None)
            if decay is not None:
                return top("preconditioned", shifted_preconditioned(op, decay, p), None)
            res = preconditioned_lambda_max(
                op, p, warm_start=self.vectors.get("preconditioned"), max_iter=self.max_iter,
                tol=self.tol, seed=self.seed,
            )  # fmt: skip
            self.vectors["preconditioned"] = res.eigenvectors.detach().cpu()
            return res.lambda_max

        sharp: float | None = None  # the quantity compared with the threshold
        if stab is None:
            self.warn_once(
                f"Sharpness: no stability threshold is known for "
                f"{type(ctx.optimizer).__name__} in this configuration (e.g. an unregistered "
                "optimizer, per-group momenta that disagree, or K-FAC over a diagonally "
                "preconditioned optimizer); logging lambda_max without threshold/ratio "
                "(register one with lightning_landscape.optim.register_optimizer)."
            )
        elif (
            self.preconditioned is not False
            and stab.preconditioned
            and (ctx.step < self.settle_steps)
        ):
            # P is read from the optimizer's state: not meaningful before it has settled
            sharp = float("nan")
        elif self.preconditioned is not False and stab.preconditioned:
            if stab.inverse_sqrt is not None:  # a non-diagonal P (K-FAC): S (H + D) S
                apply, params = stab.inverse_sqrt, op.parameters
                sharp = out["preconditioned"] = pre_sharpness(
                    lambda v: flatten(apply(unflatten(v, params)))
                )
            elif stab.preconditioner is None:
                self.warn_once(
                    "Sharpness: the optimizer has no state yet (before its first step), so the "
                    "preconditioned sharpness and the ratio start at the next measurement."
                )
                sharp = float("nan")
            else:  # P^-1/2 (H + D) P^-1/2 = P^-1/2 H P^-1/2 + D P^-1
                diag = flatten([p.reshape(-1) for p in stab.preconditioner]).to(op.dtype)
                sharp = out["preconditioned"] = pre_sharpness(diag)
        elif self.preconditioned is True:
            self.warn_once(
                f"Sharpness(preconditioned=True): {type(ctx.optimizer).__name__} is not "
                "diagonally preconditioned; logging the plain sharpness ratio."
            )
        if stab is not None:
            if sharp is None:  # the plain ratio: λ_max(H + D)
                shift = None if decay is None else constant_shift(decay)
                if decay is None:
                    sharp = est.lambda_max
                elif shift is not None:  # D = wd·I: no extra solve
                    sharp = est.lambda_max + shift
                else:  # per-group decays: its own warm-started solve
                    sharp = top("decayed", ShiftedOperator(op, decay), est.eigenvectors)
            out["threshold"] = stab.threshold
            if sharp == sharp:  # not NaN
                out["ratio"] = sharp / stab.threshold
        if self.rho is not None:
            out["rho"] = rho_sharpness(
                op,
                self.rho,
                steps=self.rho_steps,
                adaptive=self.adaptive,
                offset=self.adaptive_offset,
            ).value
        return out

    @override
    def on_logged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        if not self.progress_bar or trainer.global_step == 0:
            return
        key = "ratio" if "ratio" in metrics else "lambda_max"
        if key in metrics:
            pl_module.log(
                f"{self.name.replace('/', '_')}_{key}",
                torch.tensor(metrics[key]),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
            )
