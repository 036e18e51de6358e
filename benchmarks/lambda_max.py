"""Table 1: cost and error of λ_max on a ~85k-parameter MLP, ours (warm) vs PyHessian vs Lanczos-20.

A 64→256→256→10 MLP (tanh and ReLU) is trained on scikit-learn's digits with plain SGD
(batch 64). After ``--pretrain`` steps (mid-training) training goes on, and every ``--every``
steps λ_max of the probe loss (1024 training samples in 4 batches of 256) is measured by:

- ``ours-warm``: ``lambda_max(ProbeHessian(...), warm_start=prev.warm_start(), tol=1e-3,
  seed=i)``, the warm start coming from our own measurement ``--every`` steps earlier (the
  steady state of the callbacks, whose shared solve also draws its fresh random direction from
  the step; the first measurement is a cold solve and is not reported). ``tol`` bounds the
  eigenvalue error (residual²/gap, see ``measures/lanczos.py``); ``warm_start()`` holds the
  previous top vector and the next Ritz vector (the bottom one is not used for λ_max);
- ``ours-warm-top``: the same, warm-started from the previous top eigenvector only (its own
  chain): one product less per solve, but blind to an eigenvalue overtaking from below
  unless the fresh random direction finds it;
- ``ours-warm-tol1e-2``: ``ours-warm`` with ``tol=1e-2`` (its own chain);
- ``ours-cold``: the same without warm start (for reference);
- ``pyhessian``: ``pyhessian.hessian(model, criterion, dataloader=probe, cuda=False)
  .eigenvalues(top_n=1)`` (power iteration, its defaults ``maxIter=100, tol=1e-3``; its ``tol``
  bounds the change of the eigenvalue between iterations, not the error);
- ``pyhessian-tol1e-4``: the same with ``tol=1e-4`` (closer to our error);
- ``lanczos20``: hessian-eigenthings ``lanczos(HessianOperator(model, probe, loss), k=1,
  max_iter=20, which="LA")`` from a random start.

Every method runs at every point, in rotating order, ``--repeats`` times (median time). The
error is ``|λ − λ_ref| / λ_ref`` against a float64 Lanczos solve (cold, ``max_iter=200``,
``tol=1e-10``) on a float64 copy of the model. Times are also given in training-step
equivalents: one SGD step (forward, backward, update) on a 64-sample batch, timed inside the
same training loop.

Run: ``PYTHONPATH=. python benchmarks/lambda_max.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time
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
from hessian_eigenthings.algorithms import lanczos
from hessian_eigenthings.operators import HessianOperator
from torch import nn

from lightning_landscape.measures.eigen import EigenEstimate, top_eigen
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.sharpness import lambda_max

METHODS = (
    "ours-warm",
    "ours-warm-top",
    "ours-warm-tol1e-2",
    "ours-cold",
    "pyhessian",
    "pyhessian-tol1e-4",
    "lanczos20",
)


def _pyhessian(
    model: nn.Module, batches: list[Any], seed: int, tol: float = 1e-3
) -> tuple[float, int]:
    """Top eigenvalue by PyHessian's power iteration; ``(value, HVPs)``. Leaves RNG as found."""
    from pyhessian import hessian

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h = hessian(model, nn.functional.cross_entropy, dataloader=batches, cuda=False)
        calls = [0]
        product = h.dataloader_hv_product

        def counted(v: list[torch.Tensor]) -> Any:
            calls[0] += 1
            return product(v)

        h.dataloader_hv_product = counted
        values, _ = h.eigenvalues(top_n=1, tol=tol)
    model.train()  # PyHessian switches the model to eval mode
    model.zero_grad(set_to_none=True)
    return float(values[0]), calls[0]


def _lanczos20(model: nn.Module, probe: Probe, seed: int) -> tuple[float, int]:
    op = HessianOperator(model, probe.batches, cross_entropy)
    res = lanczos(op, k=1, max_iter=20, which="LA", seed=seed)
    return float(res.eigenvalues[0]), int(res.iterations)


def _reference(model: nn.Module, probe: Probe, max_iter: int) -> tuple[float, float, float]:
    """``(λ1, λ2, residual of λ1)`` in float64 by a long cold Lanczos solve."""
    model64 = copy.deepcopy(model).double()
    op = ProbeHessian(model64, probe.to(dtype=torch.float64), cross_entropy)
    est = top_eigen(op, k=2, max_iter=max_iter, tol=1e-10, seed=12345)
    return float(est.eigenvalues[0]), float(est.eigenvalues[1]), float(est.residuals[0])


def run(activation: str, args: argparse.Namespace) -> dict[str, Any]:
    x, y = digits()
    train_x, train_y = x[:1438], y[:1438]
    probe = Probe.from_samples((train_x[: args.probe], train_y[: args.probe]), batch_size=256)
    model = mlp(args.width, activation, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    step_times: list[float] = []

    def train(steps: int, record: bool) -> None:
        for _ in range(steps):
            idx = torch.randint(len(train_x), (64,), generator=gen)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            if record:
                step_times.append(time.perf_counter() - start)

    train(args.pretrain, record=False)
    prev: EigenEstimate | None = None
    prev_top: EigenEstimate | None = None
    prev_loose: EigenEstimate | None = None
    points: list[dict[str, Any]] = []
    for i in range(args.measurements + 1):
        if i > 0:
            train(args.every, record=True)
        ref, ref2, ref_res = _reference(model, probe, args.ref_iter)
        row: dict[str, Any] = {"step": args.pretrain + i * args.every, "ref": ref, "ref2": ref2}
        row["ref_residual"] = ref_res
        warm = None if prev is None else prev.warm_start()
        warm_top = None if prev_top is None else prev_top.eigenvectors
        warm_loose = None if prev_loose is None else prev_loose.warm_start()
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        results: dict[str, tuple[float, int]] = {}
        order = METHODS[i % len(METHODS) :] + METHODS[: i % len(METHODS)]
        monitor = ForeignCpu()
        for _ in range(args.repeats):
            for method in order:
                start = time.perf_counter()
                if method == "ours-warm":
                    op = ProbeHessian(model, probe, cross_entropy)
                    est = lambda_max(op, warm_start=warm, tol=1e-3, seed=i)
                    out = (est.lambda_max, est.matvecs)
                    current = est
                elif method == "ours-warm-top":
                    op = ProbeHessian(model, probe, cross_entropy)
                    est_top = lambda_max(op, warm_start=warm_top, tol=1e-3, seed=i)
                    out = (est_top.lambda_max, est_top.matvecs)
                    current_top = est_top
                elif method == "ours-warm-tol1e-2":
                    op = ProbeHessian(model, probe, cross_entropy)
                    est_loose = lambda_max(op, warm_start=warm_loose, tol=1e-2, seed=i)
                    out = (est_loose.lambda_max, est_loose.matvecs)
                    current_loose = est_loose
                elif method == "ours-cold":
                    op = ProbeHessian(model, probe, cross_entropy)
                    cold = lambda_max(op, tol=1e-3, seed=i)
                    out = (cold.lambda_max, cold.matvecs)
                elif method == "pyhessian":
                    out = _pyhessian(model, probe.batches, seed=i)
                elif method == "pyhessian-tol1e-4":
                    out = _pyhessian(model, probe.batches, seed=i, tol=1e-4)
                else:
                    out = _lanczos20(model, probe, seed=i)
                times[method].append(time.perf_counter() - start)
                results[method] = out
        prev, prev_top, prev_loose = current, current_top, current_loose
        row["foreign"] = monitor.read()["share"]
        for method in METHODS:
            value, hvps = results[method]
            row[method] = {
                "value": value,
                "hvps": hvps,
                "seconds": median(times[method]),
                "error": abs(value - ref) / abs(ref),
            }
        points.append(row)
        print(
            f"[{activation}] step {row['step']}: ref {ref:.5f} (λ2 {ref2:.5f}, res {ref_res:.1e}) | "
            + " | ".join(
                f"{m} {row[m]['value']:.5f} {row[m]['hvps']} HVP {1e3 * row[m]['seconds']:.0f} ms"
                for m in METHODS
            ),
            flush=True,
        )
    return {
        "activation": activation,
        "params": num_params(model),
        "step_seconds": median(step_times),
        "points": points,
    }


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    steady = result["points"][1:]  # the first point is the cold start of the warm chain
    step = result["step_seconds"]
    rows = []
    ours = [p["ours-warm"]["seconds"] for p in steady]
    for method in METHODS:
        secs = [p[method]["seconds"] for p in steady]
        errs = [p[method]["error"] for p in steady]
        rows.append(
            {
                "method": method,
                "hvps_median": median([p[method]["hvps"] for p in steady]),
                "hvps_max": max(p[method]["hvps"] for p in steady),
                "ms_median": 1e3 * median(secs),
                "step_equiv": median(secs) / step,
                "err_median": median(errs),
                "err_max": max(errs),
                "ratio_to_ours": median([s / o for s, o in zip(secs, ours)]),
            }
        )
    return rows


def table(result: dict[str, Any]) -> str:
    steady = result["points"][1:]
    foreign = median([p["foreign"] for p in steady])
    busy = sum(p["foreign"] > 0.02 for p in steady)
    lines = [
        f"{result['activation']} MLP, {result['params']} parameters, one SGD step (batch 64) = "
        f"{1e3 * result['step_seconds']:.2f} ms; {len(steady)} steady-state points; CPU used by "
        f"other processes while timing: median {100 * foreign:.1f} %, > 2 % at {busy} points",
        "",
        "| method | HVPs (median / max) | wall ms (median) | training steps | time / ours-warm "
        "| rel. error (median / max) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summarise(result):
        lines.append(
            f"| {r['method']} | {r['hvps_median']:g} / {r['hvps_max']} | {r['ms_median']:.1f} | "
            f"{r['step_equiv']:.1f} | {r['ratio_to_ours']:.2f}x | "
            f"{r['err_median']:.1e} / {r['err_max']:.1e} |"
        )
    return "\n".join(lines)


def goals(result: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in summarise(result)}
    ours, lz = rows["ours-warm"], rows["lanczos20"]
    checks = [
        (
            "<= 1e-3 error (max) in <= 6 HVPs (median), steady state",
            ours["err_max"] <= 1e-3 and ours["hvps_median"] <= 6,
        )
    ]
    for name in ("pyhessian", "pyhessian-tol1e-4"):
        pyh = rows[name]
        checks.append(
            (
                f">= 5x cheaper than {name} (ours {pyh['ratio_to_ours']:.2f}x cheaper; error "
                f"{ours['err_median']:.1e} vs {pyh['err_median']:.1e})",
                pyh["ratio_to_ours"] >= 5 and ours["err_median"] <= pyh["err_median"],
            )
        )
    checks.append(
        (
            f">= 3x cheaper than cold Lanczos-20 at equal or better error (ours "
            f"{lz['ratio_to_ours']:.2f}x cheaper; error {ours['err_median']:.1e} vs "
            f"{lz['err_median']:.1e})",
            lz["ratio_to_ours"] >= 3 and ours["err_median"] <= lz["err_median"],
        )
    )
    return "\n".join(f"- {text}: {'met' if ok else 'NOT met'}" for text, ok in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--activation", nargs="+", default=["tanh", "relu"])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--probe", type=int, default=1024)
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--measurements", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-iter", type=int, default=200)
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain, args.measurements, args.every = 50, 3, 5
        args.repeats, args.ref_iter, args.activation = 1, 60, args.activation[:1]
    setup_threads()
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    results = [run(a, args) for a in args.activation]
    info_end = machine()
    for r in results:
        print()
        print(table(r))
        print(goals(r))
    path = save(
        "lambda_max" + ("_quick" if args.quick else ""),
        {
            "machine": info,
            "load_after": info_end["load_average"],
            "args": vars(args),
            "results": results,
            "summary": [summarise(r) for r in results],
        },
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
