"""Cost of one ``SampleVarianceDecay`` measurement in training-step equivalents (digits).

On the probe of Tables 1–2 (the first 1024 digits samples, 4 batches of 256) and for the
64→256→256→10 tanh MLP (3 Linear layers; ``--cnn`` adds the zoo's SmallCNN: 2 Conv2d + 1
Linear), each repeat times, side by side in one process and in rotating order (each entry the
median of ``--inner`` calls):

- ``train16`` / ``train64``: one SGD step (forward, backward, update) on a 16-sample batch
  (the quickstart recipe's) and on a 64-sample batch (Table 1's unit), on a copy of the model;
- ``forward``: a plain forward pass over the probe under ``torch.no_grad`` (the lower bound);
- ``measure``: what the callback computes at a measured step — ``guard(model, bn="batch")``
  around ``sample_variance(model, probe, forward=loss)`` (hooks, float64 sums, the torchmetrics
  reduction, the fractions);
- ``figure``: the depth-profile figure the callback draws when one is due —
  ``panels.profile_figure`` rendered into a TensorBoard ``SummaryWriter.add_figure`` (to a
  temporary folder), as ``panels.log_figure`` does.

Ratios are taken within a repeat; medians over ``--repeats`` are reported, with the CPU time
other processes used meanwhile (``common.ForeignCpu``).

Run: ``PYTHONPATH=. python benchmarks/sample_variance.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    ForeignCpu,
    cnn,
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
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape import panels
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.variance import sample_variance

COLUMNS = ("train16", "train64", "forward", "measure", "figure")


def _median_time(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def _trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> Callable[[], None]:
    """One SGD step on the next ``batch`` samples, on a copy of ``model`` (the point stays put)."""
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    state = {"i": 0}

    def step() -> None:
        lo = (state["i"] * batch) % (len(x) - batch + 1)
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        cross_entropy(twin, (x[lo : lo + batch], y[lo : lo + batch])).backward()
        opt.step()

    step()  # the first step allocates
    return step


def run_model(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Any) -> dict:
    probe = Probe.from_samples((x[:1024], y[:1024]), batch_size=256)
    folder = tempfile.TemporaryDirectory()
    writer = SummaryWriter(folder.name)
    state = {"step": 0}
    result = sample_variance(model, probe, forward=cross_entropy)

    def forward() -> None:
        with torch.no_grad():
            for xb, _ in probe:
                model(xb)

    def measure() -> None:
        with guard(model, bn="batch", seed=0):
            sample_variance(model, probe, forward=cross_entropy)

    def figure() -> None:
        fig = panels.profile_figure(list(result.names), list(result.fractions))
        writer.add_figure("profile", fig, global_step=state["step"], close=True)
        state["step"] += 1

    fns = {
        "train16": _trainer(model, x, y, 16),
        "train64": _trainer(model, x, y, 64),
        "forward": forward,
        "measure": measure,
        "figure": figure,
    }
    for fn in fns.values():
        fn()  # warm-up
    reps = []
    monitor = ForeignCpu()
    for r in range(args.repeats):
        order = COLUMNS[r % len(COLUMNS) :] + COLUMNS[: r % len(COLUMNS)]
        reps.append({c: _median_time(fns[c], args.inner) for c in order})
    foreign = monitor.read()["share"]
    writer.close()
    folder.cleanup()
    row = {
        "model": name,
        "params": num_params(model),
        "layers": len(result.names),
        "foreign": foreign,
        "ms": {c: 1e3 * median([rep[c] for rep in reps]) for c in COLUMNS},
        "measure_over_forward": median([rep["measure"] / rep["forward"] for rep in reps]),
        "measure_in_train16": median([rep["measure"] / rep["train16"] for rep in reps]),
        "measure_in_train64": median([rep["measure"] / rep["train64"] for rep in reps]),
        "figure_in_train16": median([rep["figure"] / rep["train16"] for rep in reps]),
        "with_figure_in_train16": median(
            [(rep["measure"] + rep["figure"]) / rep["train16"] for rep in reps]
        ),
        "fractions": list(result.fractions),
        "repeats": reps,
    }
    ms = row["ms"]
    print(
        f"[{name}] train16 {ms['train16']:.2f} ms, train64 {ms['train64']:.2f} ms | forward "
        f"{ms['forward']:.1f} ms | measure {ms['measure']:.1f} ms = "
        f"{row['measure_in_train16']:.1f} / {row['measure_in_train64']:.1f} steps "
        f"({row['measure_over_forward']:.2f}× the forward) | figure {ms['figure']:.0f} ms = "
        f"{row['figure_in_train16']:.0f} steps | foreign CPU {100 * foreign:.1f} %",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | layers | forward ms | measure ms | measure / forward | in 16-batch steps "
        "| in 64-batch steps | figure ms | measure + figure in 16-batch steps | foreign CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['model']} | {r['layers']} | {ms['forward']:.1f} | {ms['measure']:.1f} "
            f"| {r['measure_over_forward']:.2f}× | {r['measure_in_train16']:.1f} "
            f"| {r['measure_in_train64']:.1f} | {ms['figure']:.0f} "
            f"| {r['with_figure_in_train16']:.0f} | {100 * r['foreign']:.1f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5, help="calls per timing (median)")
    parser.add_argument("--cnn", action="store_true", help="also the zoo's SmallCNN")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: common.THREADS)"
    )
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.inner = 1, 2
    setup_threads() if args.threads is None else setup_threads(args.threads)
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    x, y = digits()
    rows = [run_model("mlp-tanh 64-256-256-10", mlp(256, "tanh"), x, y, args)]
    if args.cnn:
        xc, yc = digits(flatten=False)
        rows.append(run_model("SmallCNN (16, 32)", cnn(), xc, yc, args))
    info_end = machine()
    print()
    print(table(rows))
    path = save(
        "sample_variance" + ("_quick" if args.quick else ""),
        {"machine": info, "load_after": info_end["load_average"], "args": vars(args), "rows": rows},
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
