"""K-FAC benchmarks: step-time overhead, time to 97% on digits, distributed eigendecompositions.

Three parts, in one run:

1. **Step time** of SGD + momentum (0.9) with and without K-FAC at ``(T_cov, T_inv) = (10, 100)``
   (exact and π damping) and ``(1, 10)``: on the digits CNN (``common.cnn``, batch 64) and on a
   ~1.1M-parameter MLP (64 → 1024 → 1024 → 10, batch ``--mlp-batch`` = 256, random inputs).
   Preconditioning costs ``4·d_out·d_in·(d_in + d_out)`` flops per layer and step (two products
   with π damping) against ``6·B·d_out·d_in`` for forward + backward, a ratio of
   ``≈ 2(d_in + d_out)/(3B)``: wide dense layers need a large batch ``B`` (convolutions count
   ``B·T`` positions) before K-FAC's per-step cost fades. Plain loops (``loss.backward();
   pre.step(); opt.step()``) run side by side in rotating order, each repeat timing
   ``--chunk`` consecutive steps (100: one chunk holds exactly 10 factor updates and one
   eigendecomposition at (10, 100)); the median chunk is reported per step. For the CNN the
   same is measured through Lightning (``KFAC`` callback vs none: time between
   ``on_train_batch_start`` and ``on_train_batch_end``). Denormal floats are flushed
   (``torch.set_flush_denormal(True)``) in every run: K-FAC's trajectories otherwise hit
   denormal activations/gradients on x86 and the comparison would time the CPU, not K-FAC.
   Goal (issue 5): ≤ 1.25× at (10, 100).
2. **Time to target**: steps and wall time (evaluation excluded) until validation accuracy
   (359 held-out digits, checked every 10 steps) reaches 97%, for SGD + momentum, Adam and
   K-FAC + SGD + momentum on the digits CNN (batch 64, at most ``--max-epochs`` epochs), each
   with a short lr sweep (and damping for K-FAC), ``--seeds`` seeds; per configuration the
   median over seeds (a seed that misses the target counts as not reaching it), the best
   configuration per optimizer by median wall time. Goal: K-FAC ≤ 0.7× SGD's wall time.
3. **Distributed eigendecompositions** (``distribute_inverses=True``) on 2 gloo processes with
   one thread each: the time of one inverse update of the MLP's factors, distributed vs every
   rank decomposing everything (median over ``--inverse-repeats``).

Output: the machine line, three Markdown tables, the goals, and the JSON
``results/kfac.json`` (``results/kfac_quick.json`` with ``--quick``, whose numbers mean
nothing). A full run takes about 10 minutes on 2 cores.

Run: ``PYTHONPATH=. python benchmarks/kfac.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from common import cnn, describe, digits, machine, save, setup_threads, wait_for_quiet
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.kfac.updates import update_inverses

# name -> (T_cov, T_inv, damping_mode)
CADENCES = {
    "K-FAC (10, 100)": (10, 100, "exact"),
    "K-FAC (10, 100) pi": (10, 100, "pi"),
    "K-FAC (1, 10)": (1, 10, "exact"),
}


def big_mlp(width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


# ------------------------------------------------------------------------------ 1. step time
class _Run:
    """One training loop (model, SGD, optional K-FAC) that can time its next chunk of steps."""

    def __init__(
        self,
        make: Callable[[], nn.Module],
        cadence: tuple[int, int, str] | None,
        data: Any,
        batch: int,
    ) -> None:
        self.model = make()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.02, momentum=0.9)
        self.pre = None
        if cadence is not None:
            self.pre = KFACPreconditioner(
                self.model, optimizer=self.opt, damping=1e-2,
                factor_update_every=cadence[0], inverse_update_every=cadence[1],
                damping_mode=cadence[2],
            )  # fmt: skip
        self.x, self.y = data
        self.batch = batch
        self.i = 0

    def chunk(self, steps: int) -> float:
        batch = self.batch
        start = time.perf_counter()
        for _ in range(steps):
            lo = (self.i * batch) % (len(self.x) - batch)
            self.i += 1
            self.opt.zero_grad()
            F.cross_entropy(self.model(self.x[lo : lo + batch]), self.y[lo : lo + batch]).backward()
            if self.pre is not None:
                self.pre.step()
            self.opt.step()
        return (time.perf_counter() - start) / steps


def step_times(args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    n = 8 * args.mlp_batch
    xr, yr = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    models: dict[str, tuple[Callable[[], nn.Module], Any, int]] = {
        "digits CNN, batch 64": (cnn, digits(flatten=False), 64),
        f"MLP 64-{args.width}-{args.width}-10, batch {args.mlp_batch}": (
            lambda: big_mlp(args.width),
            (xr, yr),
            args.mlp_batch,
        ),
    }
    out: dict[str, Any] = {}
    for label, (make, data, batch) in models.items():
        runs = {"SGD+momentum": _Run(make, None, data, batch)}
        runs.update({name: _Run(make, c, data, batch) for name, c in CADENCES.items()})
        for run in runs.values():
            run.chunk(args.warmup)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                samples[name].append(runs[name].chunk(args.chunk))
        params = sum(p.numel() for p in runs["SGD+momentum"].model.parameters())
        out[label] = {"num_params": params, "rows": _rows(samples)}
    out["digits CNN, batch 64 (Lightning)"] = lightning_step_times(args)
    return out


def lightning_step_times(args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_landscape.callbacks.kfac import KFAC
    from lightning_landscape.zoo import Classifier, DigitsDataModule
    from lightning_landscape.zoo.nets import SmallCNN

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a: Any) -> None:
            self.times.append(time.perf_counter() - self.t)

    def fit(kfac: KFAC | None) -> float:
        clock = Clock()
        torch.manual_seed(0)
        model = Classifier(SmallCNN(channels=(16, 32)), lr=0.02, momentum=0.9)
        trainer = pl.Trainer(
            max_steps=args.warmup + args.chunk, accelerator="cpu", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=[clock] + ([kfac] if kfac else []),
        )  # fmt: skip
        trainer.fit(model, DigitsDataModule(batch_size=64, flatten=False))
        return sum(clock.times[args.warmup :]) / len(clock.times[args.warmup :])

    makers: dict[str, Callable[[], KFAC | None]] = {"SGD+momentum": lambda: None}
    for name, (t_cov, t_inv, mode) in CADENCES.items():
        makers[name] = lambda c=t_cov, i=t_inv, m=mode: KFAC(  # type: ignore[misc]
            damping=1e-2, factor_update_every=c, inverse_update_every=i, damping_mode=m
        )
    samples: dict[str, list[float]] = {name: [] for name in makers}
    names = list(makers)
    for rep in range(args.lightning_repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(fit(makers[name]()))
    return {"num_params": None, "rows": _rows(samples)}


def _rows(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Median ms per step and its ratio to SGD's, per configuration."""
    base = statistics.median(samples["SGD+momentum"])
    return {
        name: {"ms": 1e3 * statistics.median(s), "ratio": statistics.median(s) / base,
               "samples_s": s}
        for name, s in samples.items()
    }  # fmt: skip


def step_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | parameters | optimizer | ms / step (median) | vs SGD |",
        "|---|---|---|---|---|",
    ]
    for model, block in result.items():
        for i, (name, row) in enumerate(block["rows"].items()):
            params = "" if i or block["num_params"] is None else f"{block['num_params']:,}"
            lines.append(
                f"| {model if i == 0 else ''} | {params} | {name} | {row['ms']:.2f} | "
                f"{row['ratio']:.2f} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------ 2. time to target
def train_to_target(
    kind: str, lr: float, damping: float | None, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    x, y = digits(flatten=False)
    n = len(x) - 359
    xt, yt, xv, yv = x[:n], y[:n], x[n:], y[n:]
    model = cnn(seed)
    if kind == "Adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = None
    if kind == "K-FAC+SGD":
        pre = KFACPreconditioner(model, optimizer=opt, damping=damping, factor_update_every=10,
                                 inverse_update_every=100)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    step, train_time, hit = 0, 0.0, None
    for _ in range(args.max_epochs):
        for idx in torch.randperm(n, generator=gen).split(64):
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            if pre is not None:
                pre.step()
            opt.step()
            train_time += time.perf_counter() - start
            step += 1
            if step % 10 == 0:
                with torch.no_grad():
                    acc = float((model(xv).argmax(1) == yv).float().mean())
                if acc >= args.target:
                    hit = (step, train_time)
                    break
        if hit is not None:
            break
    return {"steps": None if hit is None else hit[0], "seconds": None if hit is None else hit[1]}


SWEEP: dict[str, list[tuple[float, float | None]]] = {
    "SGD+momentum": [(lr, None) for lr in (0.03, 0.1, 0.3)],
    "Adam": [(lr, None) for lr in (1e-3, 3e-3, 1e-2)],
    "K-FAC+SGD": [(lr, d) for lr in (0.03, 0.1, 0.3) for d in (1e-3, 1e-2, 1e-1)],
}


def _median(values: list[float | None]) -> float | None:
    """Median with misses as +inf (``None`` if at least half the seeds missed)."""
    keyed = sorted(float("inf") if v is None else v for v in values)
    m = statistics.median(keyed)
    return None if m == float("inf") else m


def time_to_target(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, grid in SWEEP.items():
        grid = grid[:2] if args.quick else grid
        configs = []
        for lr, damping in grid:
            runs = [train_to_target(kind, lr, damping, s, args) for s in range(args.seeds)]
            configs.append({
                "lr": lr, "damping": damping, "runs": runs,
                "median_steps": _median([r["steps"] for r in runs]),
                "median_seconds": _median([r["seconds"] for r in runs]),
                "reached": sum(r["steps"] is not None for r in runs),
            })  # fmt: skip
        configs.sort(key=lambda c: c["median_seconds"] or float("inf"))
        out[kind] = configs
    return out


def target_markdown(result: dict[str, Any], target: float) -> str:
    lines = [
        f"| optimizer | lr | damping | seeds reaching {target:.0%} | median steps | median s |",
        "|---|---|---|---|---|---|",
    ]
    for kind, configs in result.items():
        for i, c in enumerate(configs):
            steps = "—" if c["median_steps"] is None else f"{c['median_steps']:.0f}"
            secs = "—" if c["median_seconds"] is None else f"{c['median_seconds']:.2f}"
            damping = "" if c["damping"] is None else f"{c['damping']:g}"
            lines.append(
                f"| {kind if i == 0 else ''} | {c['lr']:g} | {damping} | "
                f"{c['reached']}/{len(c['runs'])} | {steps} | {secs} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------- 3. distributed eigendecompositions
def _inverse_worker(rank: int, world: int, folder: str, width: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))  # fmt: skip
    try:
        model = big_mlp(width)
        pre = KFACPreconditioner(model, factor_update_every=1, kl_clip=None)
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
        F.cross_entropy(model(x), y).backward()
        pre.step()  # factors (identical on both ranks after the all-reduce)
        layers = list(pre.layers.values())
        times: dict[str, list[float]] = {"local": [], "distributed": []}
        for _ in range(repeats):
            for label in times:
                dist.barrier()
                start = time.perf_counter()
                update_inverses(layers, distribute=label == "distributed")
                dist.barrier()
                times[label].append(time.perf_counter() - start)
        if rank == 0:
            torch.save(times, f"{folder}/times.pt")
    finally:
        dist.destroy_process_group()


def distributed_inverses(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.multiprocessing.start_processes(
            _inverse_worker, args=(2, folder, args.width, args.inverse_repeats), nprocs=2,
            start_method="spawn",
        )  # fmt: skip
        times = torch.load(f"{folder}/times.pt")
    local, distributed = (statistics.median(times[k]) for k in ("local", "distributed"))
    return {"width": args.width, "local_s": local, "distributed_s": distributed,
            "ratio": distributed / local, "samples": times}  # fmt: skip


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--mlp-batch", type=int, default=256, help="batch size of the MLP")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=100, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lightning-repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--inverse-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.mlp_batch, args.warmup, args.chunk, args.repeats = 256, 64, 5, 100, 1
        args.lightning_repeats, args.seeds, args.max_epochs, args.inverse_repeats = 1, 1, 10, 2
    setup_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.linalg.eigh(torch.eye(8))  # LAPACK's one-time start-up (~1 s) is no one's bill
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    t0 = time.perf_counter()
    steps = step_times(args)
    print(step_markdown(steps))
    ratios = {k: v["rows"]["K-FAC (10, 100)"]["ratio"] for k, v in steps.items()}
    cnn_ratio = ratios["digits CNN, batch 64"]  # the plain loop; Lightning is reported too
    mlp_ratio = next(v for k, v in ratios.items() if k.startswith("MLP"))
    target = time_to_target(args)
    print()
    print(target_markdown(target, args.target))
    best = {k: v[0]["median_seconds"] for k, v in target.items()}
    inv = distributed_inverses(args)
    print()
    print(f"| inverse update, MLP width {inv['width']}, 2 ranks × 1 thread | seconds (median) |\n"
          f"|---|---|\n| every rank decomposes every factor | {inv['local_s']:.3f} |\n"
          f"| distribute_inverses=True | {inv['distributed_s']:.3f} ({inv['ratio']:.2f}×) |")  # fmt: skip
    ratio = None if best["K-FAC+SGD"] is None or best["SGD+momentum"] is None else (
        best["K-FAC+SGD"] / best["SGD+momentum"])  # fmt: skip
    goals = (
        f"goals: step time at (10, 100) CNN {cnn_ratio:.2f}, MLP {mlp_ratio:.2f} <= 1.25 "
        f"{'PASS' if max(cnn_ratio, mlp_ratio) <= 1.25 else 'FAIL'}; time to "
        f"{args.target:.0%} K-FAC/SGD "
        + ("n/a" if ratio is None else f"{ratio:.2f} <= 0.70 {'PASS' if ratio <= 0.7 else 'FAIL'}")
    )
    print()
    print(goals)
    info_end = machine()
    path = save(
        "kfac" + ("_quick" if args.quick else ""),
        {"machine": info, "load_after": info_end["load_average"], "args": vars(args),
         "step_time": steps, "time_to_target": target, "distributed_inverses": inv,
         "goals": goals, "wall_s": time.perf_counter() - t0},
        args.out,
    )  # fmt: skip
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
