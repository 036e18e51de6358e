"""Peak memory of one λ_max measurement with and without graph reuse (CPU).

``ProbeHessian(reuse_graph=True)`` keeps every probe batch's first-order gradient graph alive
for the whole solve; ``graph_memory_budget`` bounds that (above the budget it computes each
product batch by batch). For each model and configuration a **fresh subprocess** builds the
model and the probe and warms up (a forward on the probe, one product on 8 samples); then it
resets its peak resident set size to the current one (``/proc/self/clear_refs``; where that is
refused, the baseline is the peak so far, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
runs one cold
``top_eigen(ProbeHessian(...), k=1, tol=1e-3)`` and reads the peak (``VmHWM``). Reported:
the peak *increase* over the baseline during the measurement, the operator's own estimate of
the kept graphs (``graph_bytes``, from ``torch.autograd.graph.saved_tensors_hooks``), the
solve's wall time, products and λ_max. Configurations:

- ``reuse``: ``reuse_graph=True, graph_memory_budget=None`` (keep every graph);
- ``no reuse``: ``reuse_graph=False`` (forward + backward + double backward per batch and
  product, one batch's graph alive at a time);
- ``budget``: ``reuse_graph=True`` with a budget of half the estimate the ``reuse`` run
  reported, so the operator falls back to the ``no reuse`` path by itself after building
  (and dropping) its first graph.

The CPU time other processes used during the solve is recorded (``common.ForeignCpu``):
times are worth reading only where it is near 0; the memory columns barely depend on it.
The ratios are within a model: peak increase / the ``reuse`` peak increase, time / the
``reuse`` time. Peak RSS counts everything the process touched (allocator slack, kernel
workspaces), so small graphs drown in it: the probe (digits repeated to 4096 samples, 16
batches of 256) is sized so the graphs take tens of MB. A configuration whose solve saw more
than ``--max-foreign`` of other processes' CPU time runs again (at most ``--tries`` runs; the
cleanest is kept).

Run: ``PYTHONPATH=. python benchmarks/memory.py`` (about a minute on 2 cores; ``--quick``
for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = {
    "mlp": "MLP 64-256-256-10 (tanh)",
    "cnn": "SmallCNN (16, 32)",
}
CONFIGS = ("reuse", "no reuse", "budget")
MiB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> tuple[int, str]:
    """Reset the peak RSS to the current RSS where Linux allows it; the baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "reset the peak resident set size to the current RSS"
        return 1024 * (_status_kib("VmRSS") or 0), "VmHWM after clear_refs"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(
    model_key: str, config: str, probe_size: int, batch_size: int, budget: int | None
) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch
    from common import ForeignCpu, cnn, cross_entropy, digits, mlp, setup_threads

    from lightning_landscape.measures.eigen import top_eigen
    from lightning_landscape.measures.operators import ProbeHessian
    from lightning_landscape.measures.probe import Probe

    setup_threads()
    x, y = digits(flatten=model_key == "mlp")
    reps = -(-probe_size // len(x))  # digits has 1797 samples: repeat for larger probes
    x, y = torch.cat([x] * reps)[:probe_size], torch.cat([y] * reps)[:probe_size]
    model = mlp(256, "tanh") if model_key == "mlp" else cnn()
    probe = Probe.from_samples((x, y), batch_size=batch_size)
    with torch.no_grad():
        for batch in probe:
            cross_entropy(model, batch)
    # first-use costs (autograd threads, kernels) outside the measurement: one product on 8
    # samples, too small to leave freed memory behind that the measurement could reuse
    warm = ProbeHessian(model, Probe.from_samples((x[:8], y[:8])), cross_entropy)
    warm.matvec(torch.ones(warm.size))
    del warm
    before, how = _reset_peak()

    def operator(**kwargs: Any) -> ProbeHessian:
        return ProbeHessian(model, probe, cross_entropy, **kwargs)

    if config == "reuse":
        op = operator(reuse_graph=True, graph_memory_budget=None)
    elif config == "no reuse":
        op = operator(reuse_graph=False)
    else:
        op = operator(reuse_graph=True, graph_memory_budget=budget)
    monitor = ForeignCpu()
    start = time.perf_counter()
    est = top_eigen(op, k=1, tol=1e-3, max_iter=40)
    seconds = time.perf_counter() - start
    foreign = monitor.read()["share"]
    return {
        "model": model_key,
        "config": config,
        "peak_increase": _peak_rss() - before,
        "baseline": before,
        "peak_counter": how,
        "graph_bytes": op.graph_bytes,
        "reuse_at_end": op.reuse_graph,
        "seconds": seconds,
        "foreign": foreign,
        "matvecs": est.matvecs,
        "lambda_max": est.lambda_max,
        "params": op.size,
    }


def run_child(
    model_key: str, config: str, args: argparse.Namespace, budget: int | None = None
) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        json.dumps([model_key, config, args.probe_size, args.batch_size, budget]),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | config | peak RSS increase | vs reuse | graph_bytes estimate "
        "| reuse at end | λ_max solve | vs reuse | foreign CPU | products | λ_max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in MODELS:
        mine = [r for r in rows if r["model"] == key]
        if not mine:
            continue
        ref = next(r for r in mine if r["config"] == "reuse")
        for r in mine:
            est = "—" if r["graph_bytes"] is None else f"{r['graph_bytes'] / MiB:.0f} MiB"
            lines.append(
                f"| {MODELS[key]} | {r['params']:,} | {r['config']} "
                f"| {r['peak_increase'] / MiB:.0f} MiB "
                f"| {r['peak_increase'] / max(ref['peak_increase'], 1):.2f} | {est} "
                f"| {r['reuse_at_end']} | {r['seconds']:.2f} s "
                f"| {r['seconds'] / ref['seconds']:.2f} | {100 * r['foreign']:.0f} % "
                f"| {r['matvecs']} | {r['lambda_max']:.6g} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--probe-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="run a configuration again if other processes used more than this share of the CPU",
    )
    parser.add_argument("--tries", type=int, default=3, help="at most this many runs")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(*json.loads(args.child))))
        return
    if args.quick:
        args.probe_size, args.batch_size = 256, 64
    from common import describe, machine, save

    info = machine()
    print(describe(info), flush=True)
    rows = []
    for key in MODELS:
        budget = None
        for config in CONFIGS:  # "reuse" first: its estimate sets the "budget" run's budget
            runs = [run_child(key, config, args, budget)]
            while runs[-1]["foreign"] > args.max_foreign and len(runs) < args.tries:
                runs.append(run_child(key, config, args, budget))
            row = dict(min(runs, key=lambda r: r["foreign"]))
            row["tries"] = len(runs)
            rows.append(row)
            if config == "reuse":
                budget = int(row["graph_bytes"]) // 2
            print(
                f"[{key} / {config}] +{row['peak_increase'] / MiB:.0f} MiB peak RSS, "
                f"{row['seconds']:.2f} s, {row['matvecs']} products",
                flush=True,
            )
    info_end = machine()
    print()
    print(table(rows))
    path = save(
        "memory" + ("_quick" if args.quick else ""),
        {"machine": info, "load_after": info_end["load_average"], "args": vars(args), "rows": rows},
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
