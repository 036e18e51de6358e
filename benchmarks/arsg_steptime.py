"""ARSG step time vs ``torch.optim.Adam(foreach=True)``: many interleaved repeats, ratios.

``PYTHONPATH=. python benchmarks/arsg_steptime.py`` (``--quick``: a smoke run). The model of
``optimizers.py`` (4 × 1536² Linear + 200 vectors of 256, ≈ 9.5M parameters); every optimizer
on its own copy of the parameters, gradients restored outside the timed region, all of them
stepped once per repeat in rotating order. Per row: median ms and IQR of ``step()``, and the
median and IQR of the per-repeat ratio to Adam (same repeat, so a load change hits both).
``--whole`` also times the foreach path without the CPU cache buckets (the previous code), by
making every tensor one bucket. Raw samples: ``results/arsg_steptime.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import describe, machine, save, setup_threads
from optimizers import model_shapes
from torch import nn

from lightning_landscape.optim import ARSG, _base

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _whole(opt: torch.optim.Optimizer) -> Callable[[], Any]:
    """``opt.step`` with buckets as large as the whole model (the unbucketed foreach path)."""

    def step() -> Any:
        saved = _base.cache_blocks.__defaults__
        _base.cache_blocks.__defaults__ = (1 << 62,)
        try:
            return opt.step()
        finally:
            _base.cache_blocks.__defaults__ = saved

    return step


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "iqr": q[2] - q[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="also time unbucketed foreach")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    large, width, small = (2, 256, 10) if args.quick else (4, 1536, 200)
    if args.quick:
        args.repeats = 5
    setup_threads(args.threads)
    info = machine()
    print(describe(info))
    table: dict[str, tuple[Factory, bool]] = {
        "Adam (foreach)": (lambda ps: torch.optim.Adam(ps, 1e-3, foreach=True), False),
        "ARSG (foreach)": (lambda ps: ARSG(ps, foreach=True), False),
        "ARSG (single)": (lambda ps: ARSG(ps, foreach=False), False),
        "ARSG Adam mode (foreach)": (lambda ps: ARSG(ps, amsgrad=False, foreach=True), False),
    }
    if args.whole:
        table["ARSG (foreach, unbucketed)"] = (lambda ps: ARSG(ps, foreach=True), True)
    gen = torch.Generator().manual_seed(0)
    shapes = model_shapes(large, width, small)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    runs: dict[str, dict[str, Any]] = {}
    for name, (factory, whole) in table.items():
        params = [nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = factory(params)
        runs[name] = {"params": params, "step": _whole(opt) if whole else opt.step, "t": []}
    names = list(runs)
    for rep in range(args.warmup + args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            run = runs[name]
            for p, g in zip(run["params"], grads):
                p.grad.copy_(g)
            start = time.perf_counter()
            run["step"]()
            if rep >= args.warmup:
                run["t"].append(time.perf_counter() - start)
    adam = runs["Adam (foreach)"]["t"]
    rows = {}
    print("| optimizer | step ms, median (IQR) | vs Adam, per-repeat ratio median (IQR) |")
    print("|---|---|---|")
    for name, run in runs.items():
        ms = _stats([1e3 * t for t in run["t"]])
        ratio = _stats([t / a for t, a in zip(run["t"], adam)])
        rows[name] = {"ms": ms, "ratio": ratio, "samples_s": run["t"]}
        print(f"| {name} | {ms['median']:.1f} ({ms['iqr']:.1f}) | "
              f"{ratio['median']:.3f} ({ratio['iqr']:.3f}) |")  # fmt: skip
    end = machine()
    path = save("arsg_steptime" + ("_quick" if args.quick else ""),
                {"machine": info, "load_after": end["load_average"], "args": vars(args),
                 "rows": rows}, args.out)  # fmt: skip
    print(f"load average at the end: {end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
