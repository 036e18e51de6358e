"""Table 3: wall-time overhead of the measurement callbacks on a real Lightning run.

Configurations (built from ``recipes/quickstart.yaml``: digits MLP 64→128→128→10, SGD with
momentum 0.9, batch 16, i.e. 90 optimizer steps per epoch, validation every epoch):

- ``quickstart``: the recipe as written (``--epochs`` defaults to its ``max_epochs``, 120, about
  10 800 steps) **without** callbacks;
- ``quickstart+callbacks``: the same with ``Sharpness()`` and ``HessianEigenvalues()`` at
  their defaults (each ``max_overhead=0.025``; goal: total wall time ≤ 1.05×);
- ``short``: the recipe cut to ``--short-epochs`` (40: 3 600 steps) without callbacks;
- ``short+sharpness``: the same with ``Sharpness(max_overhead=0.05)`` (goal: overhead 4–6 %).

All runs share one process (after one discarded 1-epoch warm-up run); every repeat runs all configurations in rotating order
(``seed_everything(0)`` before each, so every run trains identically). The overhead is the
median over repeats of ``time(with) / time(without) − 1`` of the two runs of the same repeat.
Each run uses ``Trainer(enable_progress_bar=False, enable_checkpointing=False,
enable_model_summary=False)`` and a TensorBoardLogger in a temporary folder (as the recipe
logs to TensorBoard).

Two overheads are reported. *Wall-clock*: the median over repeats of ``time(with) /
time(without) − 1`` of the two runs of the same repeat. *In-run*: the extra wall time spent in
Lightning's callback dispatch (``_call_callback_hooks``, timed in every run) compared with the
median of the runs without the callbacks — i.e. the callbacks' hook bodies (probe capture,
scheduling, guard, measurement, logging; also timed on their own, "hook bodies") plus
Lightning's per-step dispatch of every hook to two more callbacks — divided by the rest of the
same run: the overhead if the callbacks slow nothing down outside their hooks. On a quiet machine the two agree; on a
shared one the wall-clock ratio of two ~40 s runs varies by ±10 % between repeats while the
in-run figure stays within a few tenths of a percent, so the goal is judged on the in-run
figure. The callbacks' own accounting (``callback.seconds``: what their time budget sees) and
the number of measurements are printed too.

The 2-core machine is shared, and the load average cannot tell this process's threads from
other processes: each run records the CPU time *other* processes used meanwhile
(:class:`common.ForeignCpu`), and only pairs in which both runs saw at most ``--max-foreign``
of the CPU used elsewhere enter the medians (all pairs if fewer than 3 are clean).

Run: ``PYTHONPATH=. python benchmarks/overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from common import ForeignCpu, describe, machine, median, save, setup_threads, wait_for_quiet
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer import call as lightning_call

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.callbacks.base import MeasurementCallback

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def _instantiate(spec: Any) -> Any:
    """Build ``{class_path, init_args}`` specs recursively (the subset of LightningCLI we need)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, list):
        return [_instantiate(s) for s in spec]
    return spec


def _instrument(cb: MeasurementCallback) -> dict[str, float]:
    """Count ``cb``'s measurements and time every Lightning hook it overrides (in-run cost)."""
    stats = {"measurements": 0, "hook_seconds": 0.0}
    measure = cb._measure

    def counted(*args: Any) -> None:
        stats["measurements"] += 1
        measure(*args)

    cb._measure = counted  # type: ignore[method-assign]
    for name in dir(Callback):
        if not name.startswith("on_") or getattr(type(cb), name) is getattr(Callback, name):
            continue
        hook = getattr(cb, name)

        def timed(*a: Any, _hook: Any = hook, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*a, **kw)
            finally:
                stats["hook_seconds"] += time.perf_counter() - start

        setattr(cb, name, timed)
    return stats


def _time_dispatch() -> dict[str, Any]:
    """Time Lightning's callback dispatch (``_call_callback_hooks``: every hook of every callback,
    including the per-step calls of hooks a callback does not override)."""
    original = lightning_call._call_callback_hooks
    stats: dict[str, Any] = {"seconds": 0.0, "original": original}

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stats["seconds"] += time.perf_counter() - start

    lightning_call._call_callback_hooks = timed  # type: ignore[assignment]
    return stats


def fit_once(recipe: dict[str, Any], epochs: int, callbacks: list[str], tmp: str) -> dict:
    """One seeded training run; its wall time and the callbacks' own accounting."""
    seed_everything(recipe.get("seed_everything", 0), verbose=False)
    model = _instantiate(recipe["model"])
    data = _instantiate(recipe["data"])
    cbs: list[MeasurementCallback] = []
    for name in callbacks:
        if name == "sharpness":
            cbs.append(Sharpness())
        elif name == "hessian":
            cbs.append(HessianEigenvalues())
        elif name == "sharpness5":
            cbs.append(Sharpness(max_overhead=0.05))
        else:
            raise ValueError(name)
    stats = [_instrument(cb) for cb in cbs]
    trainer_cfg = {
        k: v
        for k, v in recipe["trainer"].items()
        if k not in ("logger", "callbacks", "default_root_dir", "max_epochs")
    }
    trainer = Trainer(
        **trainer_cfg,
        max_epochs=epochs,
        callbacks=cbs,
        logger=TensorBoardLogger(tmp, name="bench"),
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    dispatch = _time_dispatch()
    monitor = ForeignCpu()
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
    finally:
        seconds = time.perf_counter() - start
        lightning_call._call_callback_hooks = dispatch["original"]  # type: ignore[assignment]
    return {
        "seconds": seconds,
        "dispatch_seconds": dispatch["seconds"],
        "foreign": monitor.read()["share"],
        "steps": trainer.global_step,
        "callbacks": [
            {
                "name": type(cb).__name__,
                "seconds": cb.seconds,
                "hook_seconds": st["hook_seconds"],
                "measurements": int(st["measurements"]),
                "last": cb.last_metrics,
            }
            for cb, st in zip(cbs, stats)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--short-epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.02,
        help="a pair of runs is clean if other processes used at most this share of the CPU",
    )
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text())
    if args.epochs is None:
        args.epochs = int(recipe["trainer"]["max_epochs"])
    if args.quick:
        args.epochs, args.short_epochs, args.repeats = 3, 3, 1
    setup_threads()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    configs = {
        "quickstart": (args.epochs, []),
        "quickstart+callbacks": (args.epochs, ["sharpness", "hessian"]),
        "short": (args.short_epochs, []),
        "short+sharpness": (args.short_epochs, ["sharpness5"]),
    }
    names = list(configs)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        fit_once(recipe, 1, ["sharpness", "hessian"], tmp)  # warm-up (imports, allocator)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                epochs, cbs = configs[name]
                out = fit_once(recipe, epochs, cbs, tmp)
                runs[name].append(out)
                extra = ", ".join(
                    f"{c['name']} {c['measurements']} meas. {c['seconds']:.2f} s"
                    for c in out["callbacks"]
                )
                print(
                    f"repeat {r} {name}: {out['seconds']:.2f} s, {out['steps']} steps, foreign "
                    f"CPU {100 * out['foreign']:.1f} %" + (f" ({extra})" if extra else ""),
                    flush=True,
                )
    info_end = machine()
    rows = []
    for base, test, goal in (
        ("quickstart", "quickstart+callbacks", "<= 5 %"),
        ("short", "short+sharpness", "4-6 %"),
    ):
        pairs = list(zip(runs[base], runs[test]))
        clean = [(b, t) for b, t in pairs if max(b["foreign"], t["foreign"]) <= args.max_foreign]
        used = clean if len(clean) >= 3 else pairs
        ratios = [t["seconds"] / b["seconds"] - 1 for b, t in used]
        # in-run overhead: time inside the callbacks' hooks over the rest of the run
        hooks = [sum(c["hook_seconds"] for c in t["callbacks"]) for t in runs[test]]
        hooks_only = [h / (t["seconds"] - h) for h, t in zip(hooks, runs[test])]
        # ... plus Lightning's dispatch of every hook to the extra callbacks, every step
        base_dispatch = median([b["dispatch_seconds"] for b in runs[base]])
        added = [t["dispatch_seconds"] - base_dispatch for t in runs[test]]
        in_run = [x / (t["seconds"] - x) for x, t in zip(added, runs[test])]
        own = [sum(c["seconds"] for c in t["callbacks"]) / t["seconds"] for t in runs[test]]
        overhead = median(in_run)
        ok = overhead <= 0.05 if goal == "<= 5 %" else 0.04 <= overhead <= 0.06
        rows.append(
            {
                "config": test,
                "steps": runs[test][0]["steps"],
                "base_s": median([b["seconds"] for b, _ in used]),
                "with_s": median([t["seconds"] for _, t in used]),
                "pairs_used": len(used),
                "pairs_clean": len(clean),
                "pairs": len(pairs),
                "wall_overhead": median(ratios),
                "wall_overheads": ratios,
                "in_run_overhead": overhead,
                "in_run_overheads": in_run,
                "hooks_only_overhead": median(hooks_only),
                "dispatch_base_s": base_dispatch,
                "own_share": median(own),
                "measurements": [[c["measurements"] for c in t["callbacks"]] for t in runs[test]],
                "goal": goal,
                "met": ok,
            }
        )
    print()
    print(
        "| configuration | steps | in-run overhead (median; per run) | of which hook bodies "
        "| wall-clock overhead (median of clean pairs; per pair) | clean pairs | without / with (s) "
        "| callbacks' own accounting | measurements (first run) | goal | met (in-run) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_run = ", ".join(f"{100 * o:.1f}" for o in row["in_run_overheads"])
        per_pair = ", ".join(f"{100 * o:+.1f}" for o in row["wall_overheads"])
        print(
            f"| {row['config']} | {row['steps']} | {100 * row['in_run_overhead']:.1f} % "
            f"({per_run}) | {100 * row['hooks_only_overhead']:.1f} % | "
            f"{100 * row['wall_overhead']:+.1f} % ({per_pair}) | "
            f"{row['pairs_clean']}/{row['pairs']} | {row['base_s']:.1f} / {row['with_s']:.1f} | "
            f"{100 * row['own_share']:.1f} % | {row['measurements'][0]} | {row['goal']} | "
            f"{'met' if row['met'] else 'NOT met'} |"
        )
    path = save(
        "overhead" + ("_quick" if args.quick else ""),
        {
            "machine": info,
            "load_after": info_end["load_average"],
            "args": vars(args),
            "runs": runs,
            "rows": rows,
        },
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
