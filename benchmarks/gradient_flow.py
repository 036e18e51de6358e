"""Cost of the gradient-flow measurements in training-step equivalents (digits MLP).

The 64→256→256→10 tanh MLP of Tables 1–2 is trained with SGD (lr 0.1, batches of 64) for
``--pretrain`` steps; then, on the probe of 1024 training samples (4 batches of 256), each
repeat times, side by side in one process:

- ``train64``: one SGD step (forward, backward, update) on a 64-sample batch, median of 10
  (on a copy of the model, so the measured point does not move) — Table 1's unit;
- ``train_full``: one full-batch GD step on the 1024 probe samples (forward/backward on one
  1024-sample batch, update), median of 5 — the unit of full-batch GD, where the window
  comparison is exact;
- ``step_gap``: ``step_gap(ProbeHessian(model, probe, loss), η)``: a fresh operator (as the
  callback builds one per measurement), 1 probe gradient + 1 HVP;
- ``window``: what ``GradientFlowDeviation`` does at the end of a ``k``-step window: a
  warm-started λ_max and λ_min (the shifted solve of ``λ_max·I − H``) at ``θ_{s+k}`` and at
  ``θ_s`` (``tol=1e-2``, the callback's default, each warm-started from the previous solve)
  and the RK4 integration for time ``kη`` with the error-controlled sub-steps of
  ``window_substeps`` (``rtol = 1e-3``, ``h·ρ ≤ 1``; ``4n`` probe gradients), ``θ_{s+k}``
  coming from ``k`` untimed full-batch GD steps of ``η = z/λ_max``.

Once per ``z`` (untimed) the deviation is also computed with the previous rule (``n =
ceil(kz)``: ``h·λ_max ≤ 1``, λ_min ignored) and with a reference (fixed ``h·ρ ≤ 0.05``, whose
RK4 error is ``20⁴`` times smaller than at ``h·ρ = 1``), to report both rules' errors.

for each ``z = ηλ_max`` of ``--z`` (stable, mid, the edge of stability ``z = 2``). Ratios are
taken within a repeat; medians over ``--repeats`` are reported, with the CPU time other
processes used meanwhile (``common.ForeignCpu``) and the load average.

Run: ``PYTHONPATH=. python benchmarks/gradient_flow.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    ForeignCpu,
    cross_entropy,
    describe,
    digits,
    machine,
    median,
    mlp,
    num_params,
    save,
    setup_threads,
    wait_for_quiet,
)
from torch import nn

from lightning_landscape.measures.flow_steps import lambda_min as bottom_eigen
from lightning_landscape.measures.gradient_flow import step_gap, window_deviation
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.sharpness import lambda_max


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    opt.zero_grad(set_to_none=True)
    cross_entropy(model, (x, y)).backward()
    opt.step()


def _step_times(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, n: int) -> float:
    """Median time of ``n`` SGD steps on batches of ``batch`` samples, on a copy of ``model``."""
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    times = []
    for i in range(n + 1):
        lo = (i * batch) % (len(x) - batch + 1)
        t, _ = _clock(lambda lo=lo: _train_step(twin, opt, x[lo : lo + batch], y[lo : lo + batch]))
        times.append(t)
    return median(times[1:])  # the first step allocates


def _gd_steps(op: ProbeHessian, eta: float, k: int) -> torch.Tensor:
    theta = op.vector()
    for _ in range(k):
        op.set_vector(theta)
        theta = theta - eta * op.loss_and_gradient()[1]
    return theta


def _window(
    model: nn.Module, probe: Probe, start: torch.Tensor, end: torch.Tensor, eta: float, k: int,
    warm: torch.Tensor, warm_low: list[torch.Tensor | None],
) -> dict[str, Any]:  # fmt: skip
    """The callback's window work at ``θ_{s+k} = end`` (model parameters set to ``end``)."""
    op = ProbeHessian(model, probe, cross_entropy)
    op.set_vector(end)
    t0 = time.perf_counter()
    est_end = lambda_max(op, warm_start=warm, tol=1e-2)
    low_end = bottom_eigen(op, shift=est_end.lambda_max, warm_start=warm_low[0], tol=1e-2)
    op.set_vector(start)
    est_start = lambda_max(op, warm_start=est_end.eigenvectors, tol=1e-2)
    low_start = bottom_eigen(op, shift=est_start.lambda_max, warm_start=low_end.vector, tol=1e-2)
    op.set_vector(end)
    t1 = time.perf_counter()
    lam = max(est_end.lambda_max, est_start.lambda_max)
    lam_min = min(low_end.value, low_start.value)
    res = window_deviation(
        op, start=start, end=end, time=k * eta, steps=k, rate=lam, rate_min=lam_min, c=1.0
    )
    t2 = time.perf_counter()
    warm_low[0] = low_start.vector
    return {
        "seconds": t2 - t0,
        "lambda_seconds": t1 - t0,
        "rk4_seconds": t2 - t1,
        "hvps": est_end.matvecs + est_start.matvecs + low_end.matvecs + low_start.matvecs,
        "lambda_min": lam_min,
        "gradients": res.gradients,
        "substeps": res.path.substeps,
        "deviation": res.deviation,
    }


def _accuracy(
    model: nn.Module, probe: Probe, start: torch.Tensor, end: torch.Tensor, eta: float, k: int,
    lam: float, lam_min: float,
) -> dict[str, float]:  # fmt: skip
    """Deviation by the previous rule (h·λ_max ≤ 1) and by a reference (h·ρ ≤ 0.05), untimed."""
    op = ProbeHessian(model, probe, cross_entropy)
    old = window_deviation(op, start=start, end=end, time=k * eta, rate=lam, c=1.0, rtol=None)
    ref = window_deviation(
        op, start=start, end=end, time=k * eta, rate=max(lam, -lam_min), c=0.05, rtol=None
    )
    op.set_vector(start)
    return {"old_gradients": old.gradients, "old_deviation": old.deviation,
            "reference_deviation": ref.deviation, "reference_gradients": ref.gradients}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    x, y = digits()
    model = mlp(256, "tanh")
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(args.pretrain):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        _train_step(model, opt, x[idx], y[idx])
    probe = Probe.from_samples((x[:1024], y[:1024]), batch_size=256)
    op = ProbeHessian(model, probe, cross_entropy)
    est = lambda_max(op, max_iter=60, tol=1e-6)
    lam, warm = est.lambda_max, est.eigenvectors
    theta_s = op.vector()
    print(f"[setup] {num_params(model)} params, λ_max = {lam:.4f} after {args.pretrain} steps")
    rows = []
    for z in args.z:
        eta = z / lam
        end = _gd_steps(ProbeHessian(model, probe, cross_entropy), eta, args.window)
        op.set_vector(theta_s)
        reps = []
        warm_low: list[torch.Tensor | None] = [None]
        monitor = ForeignCpu()
        for _ in range(args.repeats):
            t64 = _step_times(model, x, y, 64, 10)
            tfull = _step_times(model, x[:1024], y[:1024], 1024, 5)
            t_gap, gap = _clock(
                lambda eta=eta: step_gap(ProbeHessian(model, probe, cross_entropy), eta)
            )
            win = _window(model, probe, theta_s, end, eta, args.window, warm, warm_low)
            op.set_vector(theta_s)
            reps.append({"train64": t64, "train_full": tfull, "step_gap": t_gap,
                         "gap": gap.value, **{f"window_{k}": v for k, v in win.items()}})  # fmt: skip
        foreign = monitor.read()["share"]
        acc = _accuracy(model, probe, theta_s, end, eta, args.window, lam,
                        reps[0]["window_lambda_min"])  # fmt: skip
        ref = acc["reference_deviation"]
        row = {
            "z": z,
            "eta": eta,
            "k": args.window,
            "foreign": foreign,
            "ms": {
                c: 1e3 * median([r[c] for r in reps])
                for c in (
                    "train64",
                    "train_full",
                    "step_gap",
                    "window_seconds",
                    "window_lambda_seconds",
                    "window_rk4_seconds",
                )
            },  # fmt: skip
            "step_gap_in_train64": median([r["step_gap"] / r["train64"] for r in reps]),
            "step_gap_in_train_full": median([r["step_gap"] / r["train_full"] for r in reps]),
            "window_in_train64": median([r["window_seconds"] / r["train64"] for r in reps]),
            "window_in_train_full": median([r["window_seconds"] / r["train_full"] for r in reps]),
            "window_gradients": reps[0]["window_gradients"],
            "window_substeps": reps[0]["window_substeps"],
            "window_hvps": median([r["window_hvps"] for r in reps]),
            "step_gap_value": reps[0]["gap"],
            "deviation_value": reps[0]["window_deviation"],
            "lambda_min": reps[0]["window_lambda_min"],
            **acc,
            "error": abs(reps[0]["window_deviation"] / ref - 1),
            "old_error": abs(acc["old_deviation"] / ref - 1),
            "repeats": reps,
        }
        print(
            f"[z={z:g}] η={eta:.4g} | train64 {row['ms']['train64']:.2f} ms, full "
            f"{row['ms']['train_full']:.1f} ms | step_gap {row['ms']['step_gap']:.1f} ms = "
            f"{row['step_gap_in_train64']:.1f} / {row['step_gap_in_train_full']:.2f} steps | "
            f"window k={args.window}: {row['window_substeps']} sub-steps, "
            f"{row['window_gradients']} gradients + {row['window_hvps']:.0f} HVPs, "
            f"{row['ms']['window_seconds']:.0f} ms = {row['window_in_train64']:.0f} / "
            f"{row['window_in_train_full']:.1f} steps | D = {row['deviation_value']:.4g} "
            f"(error {row['error']:.1e}; previous rule {row['old_gradients']} gradients, error "
            f"{row['old_error']:.1e}), λ_min {row['lambda_min']:.3g} | foreign CPU "
            f"{100 * foreign:.1f} %",
            flush=True,
        )
        rows.append(row)
    return {"params": num_params(model), "lambda_max": lam, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| z = ηλ_max | k | step_gap: ms | in 64-batch steps | in full-batch steps "
        "| window: sub-steps | gradients + HVPs | ms | in 64-batch steps | in full-batch steps "
        "| D | error of D | previous rule: gradients | its error | foreign CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['z']:g} | {r['k']} | {r['ms']['step_gap']:.1f} | {r['step_gap_in_train64']:.1f} "
            f"| {r['step_gap_in_train_full']:.2f} | {r['window_substeps']} "
            f"| {r['window_gradients']} + {r['window_hvps']:.0f} | {r['ms']['window_seconds']:.0f} "
            f"| {r['window_in_train64']:.0f} | {r['window_in_train_full']:.1f} "
            f"| {r['deviation_value']:.4g} | {r['error']:.1e} | {r['old_gradients']} "
            f"| {r['old_error']:.1e} | {100 * r['foreign']:.1f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--window", type=int, default=10, help="steps k of a window")
    parser.add_argument("--z", type=float, nargs="+", default=[0.2, 1.0, 2.0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: common.THREADS)"
    )
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.pretrain, args.z = 1, 20, [1.0]
    setup_threads() if args.threads is None else setup_threads(args.threads)
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    result = run(args)
    info_end = machine()
    print()
    print(table(result))
    path = save(
        "gradient_flow" + ("_quick" if args.quick else ""),
        {"machine": info, "load_after": info_end["load_average"], "args": vars(args), **result},
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
