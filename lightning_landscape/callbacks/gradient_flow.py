"""``GradientFlowDeviation``: does the optimizer still follow the gradient flow it discretises?"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_landscape.callbacks.base import MeasureContext, MeasurementCallback
from lightning_landscape.callbacks.optimizer_flow import effective_scale, optimizer_flow
from lightning_landscape.callbacks.options import ProbeOptions
from lightning_landscape.callbacks.schedule import Budgeted, Schedule, Windows
from lightning_landscape.callbacks.shared import SolveRequest
from lightning_landscape.checks import check_int, check_number, check_that, is_int
from lightning_landscape.measures.flow_steps import lambda_min as bottom_eigen
from lightning_landscape.measures.gradient_flow import (
    RK4_STABILITY,
    Flow,
    step_gap,
    window_deviation,
    window_substeps,
)
from lightning_landscape.measures.guard import BNMode
from lightning_landscape.measures.operators import PreconditionedOperator, ProbeHessian, flatten
from lightning_landscape.measures.sharpness import lambda_max, preconditioned_lambda_max
from lightning_landscape.metrics import GRADIENT_FLOW

__all__ = ["GradientFlowDeviation", "effective_scale", "optimizer_flow"]

_WINDOW = ("start", "inverse", "coupled", "decoupled")


class GradientFlowDeviation(MeasurementCallback):
    """Log how far the optimizer strays from the gradient flow of the probe loss.

    Logged under ``landscape/gradient_flow/``:

    - ``step_gap`` at the measured steps (cadence as for every measurement callback):
      ``(η/2)‖JF‖/‖F‖``, the first-order relative distance between one optimizer step and the
      flow over the same time (``(η/2)‖Hg‖/‖g‖`` for GD; see
      :mod:`lightning_landscape.measures.gradient_flow`). Cost: 1 probe gradient + 1 HVP.
    - with ``window = k > 0``: every ``window_every_n_steps`` steps ``θ_s`` is snapshotted (in
      the checkpointed callback state); ``k`` steps later the flow is integrated from ``θ_s``
      by RK4 for the time ``T`` = the sum of the effective learning rates of those steps, and
      ``deviation`` = ``‖θ_{s+k} − θ_flow‖ / ‖θ_flow − θ_s‖`` and ``window_steps`` = ``k`` are
      logged at step ``s+k``. The RK4 sub-steps are error-controlled
      (:func:`~lightning_landscape.measures.flow_steps.window_substeps`): their number ``n`` is
      the smallest for which RK4's error on the extreme modes (λ_max, and λ_min under negative
      curvature, whose modes grow) is at most ``rtol`` times the deviation ``k`` GD steps of
      the window's mean step would have along them, and ``h·ρ ≤ rk4_c`` (``ρ`` the spectral
      radius). λ_max and λ_min are the extremes of warm-started solves at ``θ_s`` and at
      ``θ_{s+k}`` (of ``P^{-1/2}HP^{-1/2}`` for preconditioned optimizers, plus weight decay;
      λ_min from a solve of ``λ_max·I − H``). Cost: ``4n`` probe gradients (``n`` = 7, 33, 33
      for ``k = 10`` at ``z = ηλ_max`` = 0.2, 1, 2 at the default ``rtol``) plus two λ_max
      solves (one shared with ``Sharpness`` when it measures at the same step) and two λ_min
      solves. It runs inside the guard like every measurement and is charged to this
      callback's time budget.

    Which flow. ``η`` is the optimizer's current learning rate ``param_groups[0]["lr"]``
    (recorded at every step of a window). The flow is ``dθ/dt = −P⁻¹(∇L + c⊙θ) − d⊙θ`` with
    ``P`` the diagonal preconditioner of :mod:`lightning_landscape.optim.stability` (Adam's
    bias corrections undone; frozen at the snapshot for a window) and ``c``/``d`` the coupled
    / decoupled weight decay. *Momentum is read as a longer step*: in steady state (constant
    gradient) torch's heavy ball moves ``lr·(1−dampening)/(1−β)`` per step and Nesterov
    ``lr/(1−β)``, so they are compared with the flow for that *effective* step (in ``T`` and
    in ``η`` of ``step_gap``); comparing with time ``lr`` would report a meaningless ``≈β/(1−β)``
    (9 for β = 0.9). The lag of the momentum buffer behind the gradient then shows in the
    deviation. An optimizer without a known rule is compared with the plain flow for time
    ``lr`` (one warning).

    Caveats: ``step_gap`` is first order: for ``z = ηλ ≫ 1`` it grows like ``z/2`` while the
    true gap saturates near 1. Under mini-batch training ``θ_{s+k}`` also carries the batches'
    gradient noise, which the deviation then contains too (exact for full-batch GD on the
    probe); with ``bn="eval"`` the flow uses running BatchNorm statistics, training batch ones.

    Args:
        every_n_steps, schedule, max_overhead, probe_size, probe_batch_size, probe_dataloader,
            bn, dropout, seed, name, strict: as for :class:`~lightning_landscape.callbacks.Sharpness` (the
            cadence is that of ``step_gap``).
        settle_steps: ``step_gap`` is not taken before this many optimizer steps: before that
            momentum buffers and Adam-like bias corrections have not settled, and the effective
            step the flow's time is built from does not describe the update yet (the gap at
            step 1 read 15.7 and 49.9 on Adam runs).
        window: steps ``k`` per deviation window (``0``: no windows).
        window_every_n_steps: start a window at every multiple of this (``>= window``;
            required when ``window > 0``).
        rk4_c: cap on the RK4 sub-step, ``h·ρ ≤ rk4_c``, in ``(0, 2.78]`` (``ρ``: the spectral
            radius of the flow's Jacobian).
        rtol: target error of the integration relative to the deviation (``None``: sub-steps
            from ``rk4_c`` alone, ``n = ceil(Tρ/rk4_c)``).
        max_iter, tol: Lanczos cap and tolerance of the λ_max and λ_min solves (they only size
            RK4 steps).
        max_substeps: skip a window (with a warning) that would need more RK4 sub-steps.

    Example::

        >>> cb = GradientFlowDeviation(every_n_steps=10, window=5, window_every_n_steps=50)
        >>> GradientFlowDeviation(window=5)
        Traceback (most recent call last):
        ...
        ValueError: `window_every_n_steps` must be a positive integer >= `window` (5) when `window` > 0, got None
    """

    family = "gradient_flow"
    metrics = GRADIENT_FLOW

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float = 0.025,
        probe_size: int | Literal["auto"] = "auto",
        probe_batch_size: int = 256,
        probe_dataloader: Any = None,
        window: int = 0,
        settle_steps: int = 10,
        window_every_n_steps: int | None = None,
        rk4_c: float = 1.0,
        rtol: float | None = 1e-3,
        max_iter: int = 20,
        tol: float = 1e-2,
        max_substeps: int = 10_000,
        bn: BNMode = "eval",
        dropout: bool = False,
        seed: int = 0,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(
            ProbeOptions.pick(locals()),
            timing=lambda cadence: Schedule(
                {"gap": [Budgeted(cadence)], "window_end": [Windows(window, window_every_n_steps)]},
                cadence,
            ),
        )
        check_int("window", window, 0)
        if window > 0:
            check_that(
                "window_every_n_steps",
                window_every_n_steps,
                is_int(window_every_n_steps) and window_every_n_steps >= max(window, 1),  # type: ignore[operator]
                f"a positive integer >= `window` ({window}) when `window` > 0",
            )
        if window == 0 and window_every_n_steps is not None:
            check_that(
                "window_every_n_steps", window_every_n_steps, False, "None when `window` is 0"
            )
        check_number("rk4_c", rk4_c, high=RK4_STABILITY, include_high=True)
        check_number("rtol", rtol, none=True)
        check_int("max_iter", max_iter)
        check_int("max_substeps", max_substeps)
        check_number("tol", tol)
        check_int("settle_steps", settle_steps, 0)
        self.settle_steps = settle_steps
        self.window = window
        self.window_every_n_steps = window_every_n_steps
        self.rk4_c = float(rk4_c)
        self.rtol = None if rtol is None else float(rtol)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.max_substeps = max_substeps
        windows = self.timing.windows()
        assert windows is not None
        #: the open window (its start step and effective steps; checkpointed as ``"window"``)
        self.windows: Windows = windows

    # -- the optimizer's flow ------------------------------------------------------------------
    def _flow(
        self, optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor]
    ) -> Flow | None:
        """The flow to compare with (``None``: not available yet), warning once if unknown."""
        rule = None if optimizer is None else optimizer_flow(optimizer, params)
        if rule is None:
            self.warn_once(
                f"GradientFlowDeviation: no flow rule is known for {type(optimizer).__name__}; "
                "comparing with the plain gradient flow dθ/dt = −∇L for time lr (register a "
                "profile with lightning_landscape.optim.register_optimizer)."
            )
            return Flow()
        if rule[0] is None:
            self.warn_once(
                f"GradientFlowDeviation: no flow to compare with: {rule[1]}; nothing is "
                "measured while that lasts."
            )
        return rule[0]

    def _step(self, optimizer: torch.optim.Optimizer | None) -> float:
        """The effective learning rate ``κ·lr`` of the optimizer's next step."""
        lr = 0.0 if optimizer is None else float(optimizer.param_groups[0]["lr"])
        return lr * ((optimizer and effective_scale(optimizer)) or 1.0)

    # -- measuring -----------------------------------------------------------------------------
    @override
    def measure(self, ctx: MeasureContext, due: frozenset[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        op = ctx.operator()
        if "gap" in due and ctx.step >= self.settle_steps:
            flow = self._flow(ctx.optimizer, op.parameters)
            eta = self._step(ctx.optimizer)
            if flow is not None:
                out["step_gap"] = step_gap(op, eta, flow=flow).value if eta > 0 else 0.0
        if "window_end" in due and self.windows.is_open:
            out.update(self._finish(ctx, op))
        return out

    def _spectrum(
        self, ctx: MeasureContext, op: ProbeHessian, flow: Flow, at_start: bool
    ) -> tuple[float, float]:
        """Warm-started λ_max and λ_min of ``H`` (or ``P^-1/2 H P^-1/2``) at the operator's point."""
        warm = self.vectors.get("window_lanczos")
        target: ProbeHessian | PreconditionedOperator = op
        if flow.inverse is None and not at_start:
            est = ctx.top_k(SolveRequest(k=1, max_iter=self.max_iter, tol=self.tol))
        elif flow.inverse is None:
            est = lambda_max(
                op, warm_start=warm, max_iter=self.max_iter, tol=self.tol, seed=self.seed
            )
        else:
            diag = flow.inverse.to(device=op.device, dtype=op.dtype).reciprocal()
            target = PreconditionedOperator(op, diag)
            est = preconditioned_lambda_max(
                op, diag, warm_start=warm, max_iter=self.max_iter, tol=self.tol, seed=self.seed
            )
        self.vectors["window_lanczos"] = est.eigenvectors.detach().cpu()
        low = bottom_eigen(
            target, shift=est.lambda_max, warm_start=self.vectors.get("window_bottom"),
            max_iter=self.max_iter, tol=self.tol, seed=self.seed,
        )  # fmt: skip
        self.vectors["window_bottom"] = low.vector.detach().cpu()
        return est.lambda_max, low.value

    def _finish(self, ctx: MeasureContext, op: ProbeHessian) -> dict[str, float]:
        v = {name: self.vectors.get(f"window_{name}") for name in _WINDOW}
        device = op.device
        start = v["start"].to(device)  # type: ignore[union-attr]
        flow = Flow(*(None if v[n] is None else v[n].to(device) for n in _WINDOW[1:]))  # type: ignore[union-attr]
        time, steps = math.fsum(self.windows.times), len(self.windows.times)
        end = op.vector()
        hi, lo = self._spectrum(ctx, op, flow, at_start=False)
        op.set_vector(start.to(op.dtype))
        try:
            hi_s, lo_s = self._spectrum(ctx, op, flow, at_start=True)
        finally:
            op.set_vector(end)
        rate, rate_min = flow.rate(max(hi, hi_s)), flow.rate_min(min(lo, lo_s))
        k = max(steps, 1)  # (a window always holds its steps; never divide by 0)
        n = window_substeps(time, k, rate, rate_min, rtol=self.rtol, c=self.rk4_c)
        if n > self.max_substeps:
            self.warn_once(
                f"GradientFlowDeviation: a window needs more than max_substeps="
                f"{self.max_substeps} RK4 sub-steps (the error-controlled rule: raise "
                "max_substeps or rtol); such windows are skipped."
            )
            return {}
        result = window_deviation(
            op, start=start, end=end, time=time, steps=k, rate=rate, rate_min=rate_min,
            rtol=self.rtol, c=self.rk4_c, flow=flow, max_substeps=self.max_substeps,
        )  # fmt: skip
        return {"deviation": result.deviation, "window_steps": float(steps)}

    # -- windows -------------------------------------------------------------------------------
    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params: list[torch.Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
        flow = self._flow(trainer.optimizers[0] if trainer.optimizers else None, params)
        if flow is None:
            return  # P not available yet: the next window start will try again
        self.vectors["window_start"] = flatten([p.detach() for p in params]).cpu().clone()
        for name, t in zip(_WINDOW[1:], (flow.inverse, flow.coupled, flow.decoupled)):
            if t is not None:
                self.vectors[f"window_{name}"] = t.detach().cpu()
        self.windows.open(trainer.global_step)

    def _close(self) -> None:
        self.windows.close()
        self.vectors = {k: v for k, v in self.vectors.items() if k[7:] not in _WINDOW}

    @override
    def advance(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: frozenset[str]
    ) -> None:
        """Close the window that ended at this step; open one where one starts."""
        if "window_end" in due:
            self._close()
        if not self.windows.is_open and self.windows.starts_at(trainer.global_step):
            self._open(trainer, pl_module)

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.windows.is_open and trainer.optimizers and optimizer is trainer.optimizers[0]:
            self.windows.times.append(self._step(optimizer))
