"""K-FAC step time at (T_cov, T_inv) = (10, 100) as ratios to SGD + momentum, in one run.

``PYTHONPATH=. python benchmarks/kfac_steptime.py`` (``--quick``: a smoke run). Two models:
the digits CNN (batch 64, empirical Fisher) and the deep autoencoder of
:mod:`kfac_autoencoder` (batch 512, sampled Fisher), each with

- **plain loops** ``loss.backward(); pre.step(); opt.step()`` for SGD + momentum and K-FAC in
  every (damping mode, compute dtype) of ``CONFIGS``, all built up front and timed in rotating
  order, ``--chunk`` consecutive steps per sample (a chunk of 100 holds 10 factor updates and
  one eigendecomposition), ``--repeats`` samples each;
- **Lightning**: ``KFAC()`` (and ``KFAC(damping_mode="pi")``) callback vs none, time between
  ``on_train_batch_start`` and ``on_train_batch_end`` over the last ``--chunk`` of
  ``--warmup + --chunk`` steps, ``--lightning-repeats`` fits each, rotating order.

Per row: the median ms per step with its IQR, the ratio of medians to SGD, and the median and
IQR of the per-repeat ratios (each K-FAC sample over the SGD sample of the same repeat), the
median foreign-CPU share (``common.ForeignCpu``). Raw samples: ``results/kfac_steptime.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import ForeignCpu, cnn, describe, digits, machine, save, setup_threads
from kfac_autoencoder import Trainer, lightning_step_time, problems
from torch.nn import functional as F

CONFIGS: dict[str, dict[str, Any]] = {  # label -> KFACPreconditioner keywords
    "K-FAC exact": {},
    "K-FAC exact, bf16": {"compute_dtype": torch.bfloat16},
    "K-FAC pi": {"damping_mode": "pi"},
    "K-FAC pi, bf16": {"damping_mode": "pi", "compute_dtype": torch.bfloat16},
}


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "iqr": q[2] - q[0]}


def _rows(samples: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    base = [t for t, _ in samples["SGD+momentum"]]
    rows = {}
    for name, s in samples.items():
        times = [t for t, _ in s]
        ratios = [t / b for t, b in zip(times, base)]
        rows[name] = {"ms": {k: 1e3 * v for k, v in _stats(times).items()},
                      "ratio_of_medians": statistics.median(times) / statistics.median(base),
                      "ratio": _stats(ratios), "foreign": statistics.median(f for _, f in s),
                      "samples": s}  # fmt: skip
    return rows


def plain(args: argparse.Namespace) -> dict[str, Any]:
    x, y = digits(flatten=False)
    cnn_prob = dict(make=cnn, x=x, batch=64, likelihood=("categorical", 1.0),
                    loss=lambda out, idx: F.cross_entropy(out, y[idx]))  # fmt: skip
    ae = problems(argparse.Namespace(activation="tanh", ae_target=0.2, mlp_target=0.1))
    out: dict[str, Any] = {}
    for label, prob, fisher in (("digits CNN, batch 64", cnn_prob, "empirical"),
                                ("autoencoder, batch 512", ae["autoencoder"], "sampled")):  # fmt: skip
        runs = {"SGD+momentum": Trainer(prob, "SGD", 0.01, None, fisher, 0)}
        runs.update({n: Trainer(prob, "K-FAC", 0.01, 0.03, fisher, 0, **kw)
                     for n, kw in CONFIGS.items()})  # fmt: skip
        for run in runs.values():
            for _ in range(args.warmup):
                run.step()
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in runs}
        names = list(runs)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                clock = ForeignCpu()
                for _ in range(args.chunk):
                    runs[name].step()
                read = clock.read()
                samples[name].append((read["wall"] / args.chunk, read["share"]))
        out[label] = _rows(samples)
    return out


def lightning(args: argparse.Namespace, which: str) -> dict[str, Any]:
    def fit(mode: str | None) -> tuple[float, float]:
        kfac = None if mode is None else {"damping_mode": mode}
        return lightning_step_time(args, which, "tanh", kfac)

    modes = {"SGD+momentum": None, "K-FAC exact": "exact", "K-FAC pi": "pi"}
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in modes}
    names = list(modes)
    for rep in range(args.lightning_repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(fit(modes[name]))
    return _rows(samples)


def convergence(args: argparse.Namespace) -> dict[str, Any]:
    """Steps to the autoencoder's target loss for each K-FAC variant (lr 0.3, damping 0.01,
    sampled Fisher: §10's best configuration), ``--seeds`` seeds, evaluated every 25 steps."""
    ae = problems(argparse.Namespace(activation="tanh", ae_target=0.2, mlp_target=0.1))
    prob = ae["autoencoder"]
    out: dict[str, Any] = {}
    for name, kw in CONFIGS.items():
        runs = []
        for seed in range(args.seeds):
            run, hit, loss = Trainer(prob, "K-FAC", 0.3, 0.01, "sampled", seed, **kw), None, None
            for step in range(1, args.max_steps + 1):
                run.step()
                if step % 25 == 0:
                    loss = run.full_loss()
                    if loss <= prob["target"] or not loss < 1e3:
                        hit = step if loss <= prob["target"] else None
                        break
            runs.append({"steps": hit, "final_loss": loss})
        out[name] = runs
        print(name, runs, flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | optimizer | ms / step (IQR) | vs SGD (ratio of medians) | "
             "per-repeat ratio, median (IQR) | foreign CPU |", "|---|---|---|---|---|---|"]  # fmt: skip
    for model, rows in result.items():
        for i, (name, r) in enumerate(rows.items()):
            lines.append(f"| {model if i == 0 else ''} | {name} | {r['ms']['median']:.2f} "
                         f"({r['ms']['iqr']:.2f}) | {r['ratio_of_medians']:.2f} | "
                         f"{r['ratio']['median']:.2f} ({r['ratio']['iqr']:.2f}) | "
                         f"{r['foreign']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--lightning-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-lightning", action="store_true")
    parser.add_argument("--convergence", action="store_true", help="also steps to target")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.chunk, args.repeats, args.lightning_repeats = 2, 10, 2, 1
        args.seeds, args.max_steps = 1, 50
    setup_threads(args.threads)
    torch.set_flush_denormal(True)
    info = machine()
    print(describe(info))
    start = time.perf_counter()
    result = plain(args)
    if not args.skip_lightning:
        result["digits CNN (Lightning)"] = lightning(args, "cnn")
        result["autoencoder (Lightning)"] = lightning(args, "ae")
    print(markdown(result))
    conv = convergence(args) if args.convergence else {}
    end = machine()
    path = save("kfac_steptime" + ("_quick" if args.quick else ""),
                {"machine": info, "load_after": end["load_average"], "args": vars(args),
                 "seconds": time.perf_counter() - start, "rows": result,
                 "convergence": conv}, args.out)  # fmt: skip
    print(f"load average at the end: {end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
