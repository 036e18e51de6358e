"""Cost of one loss-landscape evaluation, in training-step equivalents.

Model: the digits MLP of ``recipes/landscape.yaml`` (64→128→128→10, ReLU; also the tanh
64→256→256→10 MLP of the other tables with ``--wide``). Probe: 1024 digits samples in 4
batches of 256 (the callback's default). Each repeat times, in rotating order:

- ``surface``: :func:`~lightning_landscape.measures.landscape.loss_surface` on a 21×21 grid
  (441 points plus θ itself, default ``chunk_size=32``), directions included;
- ``interpolation``: 21 points on the line θ0 → θ;
- ``probe_loss``: one probe loss (``ProbeHessian.loss()``: 4 forward passes, no backward);
- ``probe_gradient``: one probe gradient (forward + backward on the probe);
- ``figure``: the 21×21 contour drawn and rendered to RGBA (what ``add_figure`` does);
- ``step_b16`` / ``step_b512``: one plain training step (SGD with momentum 0.9: forward,
  backward, ``optimizer.step``) on a batch of 16 / 512 digits (the recipe's two variants).

Reported: milliseconds (median over repeats) and the landscape's cost (surface +
interpolation + figure, what one ``LossLandscape`` measurement costs) divided by each step
(training-step equivalents), and the surface's cost per grid point divided by one probe loss.
Lightning's own per-step overhead (a few ms on this CPU) is not in the steps, so in a real run
the landscape costs fewer steps than reported. The CPU time other processes used meanwhile is
recorded (``common.ForeignCpu``).

Run: ``PYTHONPATH=. python benchmarks/landscape.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
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

from lightning_landscape.figures import contour_figure
from lightning_landscape.measures.landscape import (
    filter_normalized_directions,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe
from lightning_landscape.zoo.nets import MLP

RESOLUTION = 21
COLUMNS = (
    "surface",
    "interpolation",
    "figure",
    "probe_loss",
    "probe_gradient",
    "step_b16",
    "step_b512",
)


def _clock(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)  # tiny lr: θ barely moves

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        cross_entropy(model, (x, y)).backward()
        opt.step()

    return step


def _one_repeat(
    model: nn.Module, probe: Probe, x: torch.Tensor, y: torch.Tensor, rotate: int, res: int
) -> dict[str, float]:
    op = ProbeHessian(model, probe, cross_entropy)
    theta0 = op.vector() + 0.1 * torch.randn(op.size, generator=torch.Generator().manual_seed(1))
    out: dict[str, float] = {}
    grid: dict[str, torch.Tensor] = {}

    def surface() -> None:
        def run() -> None:
            dirs = filter_normalized_directions(op.parameters, count=2, seed=0)
            grid["losses"] = loss_surface(op, dirs, resolution=res).losses

        out["surface"] = _clock(run)

    def interpolation() -> None:
        out["interpolation"] = _clock(lambda: linear_interpolation(op, theta0, resolution=res))

    def figure() -> None:
        if "losses" not in grid:
            surface()
        axis = torch.linspace(-1, 1, res).tolist()

        def draw() -> None:
            fig = contour_figure(axis, axis, grid["losses"].tolist())
            fig.canvas.draw()
            fig.canvas.buffer_rgba()

        out["figure"] = _clock(draw)

    def probe_loss() -> None:
        out["probe_loss"] = median([_clock(op.loss) for _ in range(5)])

    def probe_gradient() -> None:
        out["probe_gradient"] = median([_clock(op.loss_and_gradient) for _ in range(3)])

    def steps() -> None:
        for b in (16, 512):
            step = _step(model, x[:b], y[:b])
            step()  # optimizer state allocated
            out[f"step_b{b}"] = median([_clock(step) for _ in range(20)])

    parts = [surface, interpolation, figure, probe_loss, probe_gradient, steps]
    k = rotate % len(parts)
    for part in parts[k:] + parts[:k]:
        part()
    return out


def run(name: str, model: nn.Module, repeats: int, res: int) -> dict[str, Any]:
    x, y = digits()
    probe = Probe.from_samples((x[:1024], y[:1024]), batch_size=256)
    _one_repeat(model, probe, x, y, 0, res)  # warm-up, discarded
    monitor = ForeignCpu()
    reps = [_one_repeat(model, probe, x, y, r, res) for r in range(repeats)]
    foreign = monitor.read()["share"]
    ms = {c: 1e3 * median([r[c] for r in reps]) for c in COLUMNS}
    total = [r["surface"] + r["interpolation"] + r["figure"] for r in reps]
    ratios = {
        "steps_b16": median([t / r["step_b16"] for t, r in zip(total, reps)]),
        "steps_b512": median([t / r["step_b512"] for t, r in zip(total, reps)]),
        "probe_gradients": median([t / r["probe_gradient"] for t, r in zip(total, reps)]),
        "point_over_probe_loss": median(
            [r["surface"] / (res**2 + 1) / r["probe_loss"] for r in reps]
        ),
    }
    print(
        f"[{name}] {num_params(model)} params, foreign CPU {100 * foreign:.1f} % | "
        + " | ".join(f"{c} {ms[c]:.1f} ms" for c in COLUMNS)
        + " | "
        + " | ".join(f"{k} {v:.1f}" for k, v in ratios.items()),
        flush=True,
    )
    return {
        "model": name,
        "params": num_params(model),
        "resolution": res,
        "ms": ms,
        "landscape_ms": 1e3 * median(total),
        "ratios": ratios,
        "foreign": foreign,
        "repeats": reps,
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | params | foreign CPU | grid | surface ms | interpolation ms | figure ms "
        "| landscape total ms | = steps (batch 16) | = steps (batch 512) | = probe gradients "
        "| grid point / probe loss |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q, ms = r["ratios"], r["ms"]
        lines.append(
            f"| {r['model']} | {r['params']} | {100 * r['foreign']:.1f} % | "
            f"{r['resolution']}×{r['resolution']} | {ms['surface']:.0f} | "
            f"{ms['interpolation']:.0f} | {ms['figure']:.0f} | {r['landscape_ms']:.0f} | "
            f"{q['steps_b16']:.0f} | {q['steps_b512']:.0f} | {q['probe_gradients']:.0f} | "
            f"{q['point_over_probe_loss']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wide", action="store_true", help="also the tanh 64-256-256-10 MLP")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait for a quiet machine")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    args = parser.parse_args()
    res = 5 if args.quick else RESOLUTION
    if args.quick:
        args.repeats = 1
    if args.threads is None:
        setup_threads()
    else:
        setup_threads(args.threads)
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, max_minutes=40)
    info = machine()
    print(describe(info))
    torch.manual_seed(0)
    models = [("MLP relu 64-128-128-10 (recipe)", MLP(64, 10, depth=2, width=128))]
    if args.wide:
        models.append(("MLP tanh 64-256-256-10", mlp(256, "tanh")))
    results = [run(name, model, args.repeats, res) for name, model in models]
    info_end = machine()
    print()
    print(table(results))
    path = save(
        "landscape" + ("_quick" if args.quick else ""),
        {
            "machine": info,
            "load_after": info_end["load_average"],
            "args": vars(args),
            "results": results,
        },
        args.out,
    )
    print(f"\nload average at the end: {info_end['load_average']}; raw numbers: {path}")


if __name__ == "__main__":
    main()
