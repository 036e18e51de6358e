"""K-FAC where curvature matters: a deep autoencoder and a deep narrow MLP on digits.

Two parts (``PYTHONPATH=. python benchmarks/kfac_autoencoder.py``; ``--quick``: a smoke run):

1. **Time to a target training loss**, evaluated on the whole training split every
   ``--eval-every`` steps (evaluation time excluded), for tuned SGD + momentum (0.9), Adam, and
   K-FAC (T_cov, T_inv) = (10, 100) over SGD + momentum, each with a short lr (and damping)
   sweep (``SWEEPS``), ``--seeds`` seeds; per configuration the median over seeds (a miss
   counts as infinite), the best configuration per optimizer by median wall time.

   - *autoencoder*: 64-256-128-64-16-64-128-256-64, tanh (``--activation``), linear code and
     output, loss ``mean_n Σ_pixels (f(x_n) − x_n)²`` on the 1438 training digits, batch 512,
     target ``--ae-target`` (0.2), at most ``--max-steps`` steps;
   - *deep MLP*: 64 → 8 × 32 tanh → 10, cross-entropy, batch 256, target ``--mlp-target``.

   K-FAC runs with the true (sampled) Fisher, ``pre.sample_fisher(outputs, ...)`` on the
   factor-update steps (Gaussian of variance ½ for the squared error, categorical for the
   classifier, as in the K-FAC paper, arXiv:1503.05671), and once with the default empirical
   Fisher for comparison. Loss curves of the best configurations: ``results/kfac_autoencoder.png``.
   ``--only KIND:lr[:damping[:fisher]] ...`` restricts the sweep (e.g. to the best configurations);
   ``--mlp-max-steps`` / ``--mlp-eval-every`` set the deep MLP's own budget and evaluation grid.
2. **Step time** of SGD + momentum vs K-FAC at (10, 100) on the digits CNN (batch 64) and the
   autoencoder (batch 512, sampled Fisher): plain loops in rotating order, ``--chunk`` steps per
   sample, each with its foreign CPU share (``common.ForeignCpu``; samples above
   ``--max-foreign`` are left out of the medians while at least 3 remain), float32 and
   ``compute_dtype=torch.bfloat16`` products; and the same through Lightning (``KFAC``
   callback vs none, time between ``on_train_batch_start`` and ``on_train_batch_end``).

Output: Markdown tables, the goals and ``results/kfac_autoencoder.json`` (machine, load, samples).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import ForeignCpu, cnn, describe, digits, machine, save, setup_threads
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.zoo import Autoencoder

Problem = dict[str, Any]

SWEEPS: dict[str, dict[str, list[tuple[float, float | None, str]]]] = {
    # optimizer -> [(lr, damping, fisher)]
    "autoencoder": {
        "SGD+momentum": [(lr, None, "") for lr in (0.003, 0.01, 0.03, 0.1)],
        "Adam": [(lr, None, "") for lr in (1e-3, 2e-3, 3e-3, 5e-3, 1e-2)],
        "K-FAC+SGD": [(0.3, d, "sampled") for d in (0.01, 0.03, 0.1)] + [(0.3, 0.03, "empirical")],
    },
    "deep MLP": {
        "SGD+momentum": [(lr, None, "") for lr in (0.03, 0.1, 0.2)],
        "Adam": [(lr, None, "") for lr in (1e-3, 3e-3, 1e-2)],
        "K-FAC+SGD": [(lr, d, "sampled") for lr in (0.1, 0.3) for d in (0.01, 0.1, 0.3)]
        + [(0.3, 0.1, "empirical")],
    },
}


def selected(kind: str, lr: float, damping: float | None, fisher: str, only: list[str]) -> bool:
    """Whether the configuration matches one of ``--only``'s ``KIND:lr[:damping[:fisher]]``."""

    def close(want: str, have: float | None) -> bool:
        return have is not None and abs(float(want) - have) <= 1e-9 * abs(have)

    for spec in only:
        name, *fields = spec.split(":") + ["", "", ""]
        if (name == kind and (not fields[0] or close(fields[0], lr))
                and (not fields[1] or close(fields[1], damping))
                and (not fields[2] or fields[2] == fisher)):  # fmt: skip
            return True
    return not only


def deep_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip([64] + [32] * 8, [32] * 8):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


def problems(args: argparse.Namespace) -> dict[str, Problem]:
    x, y = digits()
    n = len(x) - 359  # the first 1438 (as DigitsDataModule's training split size)
    xt, yt = x[:n], y[:n]

    def sq(out: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        target = xt if idx is None else xt[idx]
        return (out - target).pow(2).sum(1).mean()

    def ce(out: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(out, yt if idx is None else yt[idx])

    def make_ae(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Autoencoder((64, 256, 128, 64, 16), activation=args.activation)

    return {
        "autoencoder": dict(make=make_ae, x=xt, loss=sq, batch=512, target=args.ae_target,
                            likelihood=("gaussian", 0.5), max_steps=args.max_steps,
                            eval_every=args.eval_every),
        "deep MLP": dict(make=deep_mlp, x=xt, loss=ce, batch=256, target=args.mlp_target,
                         likelihood=("categorical", 1.0),
                         max_steps=args.mlp_max_steps or args.max_steps,
                         eval_every=args.mlp_eval_every or args.eval_every),
    }  # fmt: skip


class Trainer:
    """One optimizer on one problem; ``step()`` takes one training step."""

    def __init__(self, prob: Problem, kind: str, lr: float, damping: float | None,
                 fisher: str, seed: int, **kfac: Any) -> None:  # fmt: skip
        self.prob, self.model = prob, prob["make"](seed)
        params = self.model.parameters()
        self.opt: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=lr) if kind == "Adam"
            else torch.optim.SGD(params, lr=lr, momentum=0.9)
        )  # fmt: skip
        self.pre = None
        if kind.startswith("K-FAC"):
            self.pre = KFACPreconditioner(self.model, optimizer=self.opt, damping=damping,
                                          factor_update_every=10, inverse_update_every=100, **kfac)  # fmt: skip
        self.sampled = fisher == "sampled"
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[torch.Tensor] = []

    def step(self) -> None:
        if not self.order:  # an epoch of full batches (the remainder is dropped)
            n, b = len(self.prob["x"]), self.prob["batch"]
            self.order = list(torch.randperm(n, generator=self.gen)[: n - n % b].split(b))
        idx = self.order.pop()
        self.opt.zero_grad()
        out = self.model(self.prob["x"][idx])
        if self.pre is not None and self.sampled:
            likelihood, variance = self.prob["likelihood"]
            self.pre.sample_fisher(out, likelihood, variance=variance)
        self.prob["loss"](out, idx).backward()
        if self.pre is not None:
            self.pre.step()
        self.opt.step()

    def full_loss(self) -> float:
        with torch.no_grad():
            return float(self.prob["loss"](self.model(self.prob["x"]), None))


def to_target(prob: Problem, kind: str, lr: float, damping: float | None, fisher: str,
              seed: int, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    run = Trainer(prob, kind, lr, damping, fisher, seed)
    curve, train_s, hit = [(0, run.full_loss())], 0.0, None
    for step in range(1, prob["max_steps"] + 1):
        start = time.perf_counter()
        run.step()
        train_s += time.perf_counter() - start
        if step % prob["eval_every"] == 0:
            loss = run.full_loss()
            curve.append((step, loss))
            if loss <= prob["target"]:
                hit = (step, train_s)
                break
            if not loss < 1e3:  # diverged (or NaN)
                break
    return {"steps": hit and hit[0], "seconds": hit and hit[1], "curve": curve}


def _median(values: list[float | None]) -> float | None:
    keyed = sorted(float("inf") if v is None else v for v in values)
    m = statistics.median(keyed)
    return None if m == float("inf") else m


def time_to_target(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, prob in problems(args).items():
        if name not in args.problems:
            continue
        out[name] = {"target": prob["target"], "max_steps": prob["max_steps"],
                     "eval_every": prob["eval_every"], "optimizers": {}}  # fmt: skip
        for kind, grid in SWEEPS[name].items():
            configs = []
            grid = [g for g in grid if selected(kind, *g, args.only)]
            for lr, damping, fisher in grid[:2] if args.quick else grid:
                runs = [to_target(prob, kind, lr, damping, fisher, s, args)
                        for s in range(args.seeds)]  # fmt: skip
                configs.append({
                    "lr": lr, "damping": damping, "fisher": fisher, "runs": runs,
                    "median_steps": _median([r["steps"] for r in runs]),
                    "median_seconds": _median([r["seconds"] for r in runs]),
                    "reached": sum(r["steps"] is not None for r in runs),
                    "final_loss": statistics.median(r["curve"][-1][1] for r in runs),
                })  # fmt: skip
                print(f"  {name} {kind} lr={lr:g} damping={damping} {fisher}: "
                      f"{configs[-1]['median_steps']} steps, {configs[-1]['median_seconds']} s",
                      flush=True)  # fmt: skip
            configs.sort(key=lambda c: (c["median_seconds"] or float("inf"), c["final_loss"]))
            if configs:
                out[name]["optimizers"][kind] = configs
    return out


def target_markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, block in result.items():
        best = {k: v[0] for k, v in block["optimizers"].items()}
        adam = best.get("Adam", {"median_steps": None, "median_seconds": None})
        lines += [f"\n**{name}**, target training loss {block['target']:g}\n",
                  "| optimizer | lr | damping | Fisher | seeds reaching | median steps | "
                  "median s | steps / Adam's | s / Adam's | median final loss |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, configs in block["optimizers"].items():
            for i, c in enumerate(configs):
                steps, secs = c["median_steps"], c["median_seconds"]
                rs = "—" if steps is None or adam["median_steps"] is None else (
                    f"{steps / adam['median_steps']:.2f}")  # fmt: skip
                rt = "—" if secs is None or adam["median_seconds"] is None else (
                    f"{secs / adam['median_seconds']:.2f}")  # fmt: skip
                lines.append(
                    f"| {kind if i == 0 else ''} | {c['lr']:g} | "
                    f"{'' if c['damping'] is None else format(c['damping'], 'g')} | {c['fisher']} | "
                    f"{c['reached']}/{len(c['runs'])} | {'—' if steps is None else int(steps)} | "
                    f"{'—' if secs is None else f'{secs:.2f}'} | {rs} | {rt} | "
                    f"{c['final_loss']:.3g} |"
                )
    return "\n".join(lines)


def figure(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(6 * len(result), 4.2), squeeze=False)
    colors = {"SGD+momentum": "tab:gray", "Adam": "tab:blue", "K-FAC+SGD": "tab:red"}
    for ax, (name, block) in zip(axes[0], result.items()):
        for kind, configs in block["optimizers"].items():
            c = configs[0]
            for i, r in enumerate(c["runs"]):
                steps, losses = zip(*r["curve"])
                label = f"{kind} (lr {c['lr']:g}" + (
                    f", λ {c['damping']:g}, {c['fisher']})" if c["damping"] else ")"
                )
                ax.plot(steps, losses, color=colors[kind], alpha=0.8, lw=1.2,
                        label=label if i == 0 else None)  # fmt: skip
        ax.axhline(block["target"], color="k", ls=":", lw=1, label="target")
        title = f"{name} (target {block['target']:g}, {len(c['runs'])} seeds)"
        ax.set(yscale="log", xlabel="step", ylabel="training loss", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------ step time
def _filtered(samples: list[tuple[float, float]], max_foreign: float) -> float:
    clean = [t for t, share in samples if share <= max_foreign]
    return statistics.median(clean if len(clean) >= 3 else [t for t, _ in samples])


def step_times(args: argparse.Namespace) -> dict[str, Any]:
    x, y = digits(flatten=False)
    ae = problems(args)["autoencoder"]
    cnn_prob = dict(make=cnn, x=x, batch=64, likelihood=("categorical", 1.0),
                    loss=lambda out, idx: F.cross_entropy(out, y[idx]))  # fmt: skip
    configs: dict[str, tuple[str, str, torch.dtype | None]] = {
        "SGD+momentum": ("SGD", "", None),
        "K-FAC (10, 100)": ("K-FAC", "", None),
        "K-FAC (10, 100) bf16": ("K-FAC", "", torch.bfloat16),
    }
    out: dict[str, Any] = {}
    for label, prob, fisher in (("digits CNN, batch 64", cnn_prob, "empirical"),
                                ("autoencoder, batch 512", ae, "sampled")):  # fmt: skip
        runs = {n: Trainer(prob, kind, 0.01, 0.03, fisher, 0, compute_dtype=cd)
                for n, (kind, _, cd) in configs.items()}  # fmt: skip
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
        out[label] = _rows(samples, args.max_foreign)
    out["digits CNN, batch 64 (Lightning)"] = lightning_times(args, "cnn")
    out["autoencoder, batch 512 (Lightning)"] = lightning_times(args, "ae")
    return out


def _rows(samples: dict[str, list[tuple[float, float]]], max_foreign: float) -> dict[str, Any]:
    base = _filtered(samples["SGD+momentum"], max_foreign)
    return {
        n: {"ms": 1e3 * _filtered(s, max_foreign), "ratio": _filtered(s, max_foreign) / base,
            "foreign_median": statistics.median(sh for _, sh in s), "samples": s}
        for n, s in samples.items()
    }  # fmt: skip


def lightning_step_time(
    args: argparse.Namespace, which: str, activation: str, kfac: dict[str, Any] | None
) -> tuple[float, float]:
    """One Lightning fit of ``which`` (``"cnn"`` or the autoencoder), with the ``KFAC()``
    callback at (10, 100) and the ``kfac`` keywords unless ``None``: the mean seconds per
    training batch after ``args.warmup`` steps and the median foreign CPU share."""
    import lightning.pytorch as pl

    from lightning_landscape.callbacks.kfac import KFAC
    from lightning_landscape.zoo import (
        Autoencoder,
        Classifier,
        DigitsDataModule,
        DigitsReconstructionDataModule,
        Reconstruction,
        SmallCNN,
    )

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []

        def on_train_batch_start(self, *a: Any) -> None:
            self.clock = ForeignCpu()

        def on_train_batch_end(self, *a: Any) -> None:
            read = self.clock.read()
            self.times.append((read["wall"], read["share"]))

    clock = Clock()
    torch.manual_seed(0)
    if which == "cnn":
        model: pl.LightningModule = Classifier(SmallCNN(channels=(16, 32)), lr=0.02)
        data: pl.LightningDataModule = DigitsDataModule(batch_size=64, flatten=False)
    else:
        model = Reconstruction(Autoencoder(activation=activation), lr=0.3)
        data = DigitsReconstructionDataModule(batch_size=512)
    callbacks: list[pl.Callback] = [clock]
    if kfac is not None:
        callbacks.append(
            KFAC(damping=0.03, factor_update_every=10, inverse_update_every=100, **kfac)
        )
    trainer = pl.Trainer(
        max_steps=args.warmup + args.chunk, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, data)
    kept = clock.times[args.warmup :]
    return sum(t for t, _ in kept) / len(kept), statistics.median(s for _, s in kept)


def lightning_times(args: argparse.Namespace, which: str) -> dict[str, Any]:
    def fit(kfac: bool) -> tuple[float, float]:
        return lightning_step_time(args, which, args.activation, {} if kfac else None)

    samples: dict[str, list[tuple[float, float]]] = {"SGD+momentum": [], "K-FAC (10, 100)": []}
    for rep in range(args.lightning_repeats):
        for name in list(samples)[rep % 2 :] + list(samples)[: rep % 2]:
            samples[name].append(fit(name != "SGD+momentum"))
    return _rows(samples, args.max_foreign)


def step_markdown(result: dict[str, Any]) -> str:
    lines = ["| model | optimizer | ms / step (median) | vs SGD | foreign CPU (median) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for model, rows in result.items():
        for i, (name, row) in enumerate(rows.items()):
            lines.append(f"| {model if i == 0 else ''} | {name} | {row['ms']:.2f} | "
                         f"{row['ratio']:.2f} | {row['foreign_median']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--activation", default="tanh", choices=("tanh", "sigmoid"))
    parser.add_argument("--ae-target", type=float, default=0.2)
    parser.add_argument("--mlp-target", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=2500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--mlp-max-steps", type=int, default=None, help="default: --max-steps")
    parser.add_argument("--mlp-eval-every", type=int, default=None, help="default: --eval-every")
    parser.add_argument("--only", nargs="+", default=[], metavar="KIND:lr[:damping[:fisher]]",
                        help="restrict the sweep to these configurations, e.g. Adam:0.003 "
                        "K-FAC+SGD:0.3:0.01:sampled SGD+momentum:0.03")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lightning-repeats", type=int, default=4)
    parser.add_argument("--max-foreign", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-target", action="store_true", help="step times only")
    parser.add_argument("--skip-steps", action="store_true", help="time to target only")
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "deep MLP"])
    parser.add_argument("--out", default=None, help="folder for the JSON and the figure")
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.seeds, args.repeats, args.lightning_repeats = 100, 1, 2, 2
    setup_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.linalg.eigh(torch.eye(8))  # LAPACK's one-time start-up is no one's bill
    info = machine()
    print(describe(info), flush=True)
    t0 = time.perf_counter()
    steps = {} if args.skip_steps else step_times(args)
    print(step_markdown(steps), flush=True)
    payload: dict[str, Any] = {"machine": info, "args": vars(args), "step_time": steps}
    name = "kfac_autoencoder" + ("_quick" if args.quick else "")
    if not args.skip_target:
        target = time_to_target(args)
        print(target_markdown(target))
        payload["time_to_target"] = target
        path = save(name, payload, args.out)
        figure(target, str(path.with_suffix(".png")))
        ae = {k: v[0] for k, v in target.get("autoencoder", {}).get("optimizers", {}).items()}
        both = {"K-FAC+SGD", "Adam"} <= set(ae)
        if both and ae["K-FAC+SGD"]["median_steps"] and ae["Adam"]["median_steps"]:
            rs = ae["K-FAC+SGD"]["median_steps"] / ae["Adam"]["median_steps"]
            rt = ae["K-FAC+SGD"]["median_seconds"] / ae["Adam"]["median_seconds"]
            print(f"\ngoals (autoencoder): K-FAC/Adam steps {rs:.2f} <= 0.5 "
                  f"{'PASS' if rs <= 0.5 else 'FAIL'}, wall {rt:.2f} <= 0.7 "
                  f"{'PASS' if rt <= 0.7 else 'FAIL'}")  # fmt: skip
    if steps:
        worst = max(steps[k]["K-FAC (10, 100)"]["ratio"] for k in steps)
        print(f"goal: K-FAC (10, 100) float32 step time <= 1.25x SGD: worst {worst:.2f}")
    payload["wall_s"] = time.perf_counter() - t0
    payload["load_after"] = machine()["load_average"]
    path = save(name, payload, args.out)
    print(f"load average at the end: {payload['load_after']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
