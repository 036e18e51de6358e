"""RESULTS §11: what the default cadence gives — points, the second point's step, and the price.

Rows: four models people train, each for a short and a long run, each fitted twice in one
process — without callbacks and with ``Sharpness()`` + ``HessianEigenvalues()`` at their
defaults (``probe_size="auto"``, ``max_overhead=0.025`` each, the planned cadence):

- ``quickstart``: the recipe's digits MLP 64→128→128→10, SGD momentum 0.9, batch 16;
- ``resnet``: a ResNet-style CNN on the digits as 1×8×8 images (bias-free convs, BatchNorm,
  residual adds), batch 32, SGD momentum;
- ``transformer``: a 2-block causal transformer LM (SDPA attention) on synthetic token
  sequences (vocabulary 64, length 16, width 64), AdamW, batch 32;
- ``mlp1m``: a 1.1M-parameter MLP 64→1024→1024→10 on the digits, Adam, batch 64.

Reported per run: points logged per callback, the step of the second point, and the overhead
as the ratio of *process CPU time* (``time.process_time``, all threads of this process, so
other processes on the shared machine do not count) with/without callbacks, median over
``--pairs`` interleaved pairs; wall-time ratios too, with the CPU time other processes used
meanwhile (``common.ForeignCpu``) to flag a busy machine.

Run: ``PYTHONPATH=. python benchmarks/cadence.py [--short 1000 --long 10000 --pairs 3]``
(``--long 0``: the short rows only). Also reported: the cost of the cold step-0 point of each
callback (with the probe capture and calibration, charged to the first) and the share each
callback accounted for itself (measuring + hook dispatch), against the CPU-time overhead.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from common import ForeignCpu, describe, machine, median, save, setup_threads
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.zoo import MLP, Classifier, DigitsDataModule


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, list[int]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k in metrics:
            self.steps.setdefault(k, []).append(int(step or 0))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)), inplace=True)
        return F.relu(x + self.b2(self.c2(h)), inplace=True)


class ResNet(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x.view(-1, 1, 8, 8))))
        return self.head(h.mean(dim=(2, 3)))


class LM(pl.LightningModule):
    """A 2-block causal transformer LM on token sequences (SDPA through nn.TransformerEncoder)."""

    def __init__(self, vocab: int = 64, width: int = 64, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.mask = nn.Transformer.generate_square_subsequent_mask(length)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        h = self.embed(x[:, :-1]) + self.pos[: x.shape[1] - 1]
        n = h.shape[1]
        h = self.encoder(h, mask=self.mask[:n, :n], is_causal=True)
        loss = F.cross_entropy(self.head(h).flatten(0, 1), x[:, 1:].flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class AdamClassifier(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def tokens(n: int = 2048, vocab: int = 64, length: int = 17) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    # a learnable sequence: x_{t+1} = (a x_t + b) mod vocab with per-sequence a, b
    a = torch.randint(1, 8, (n, 1), generator=gen)
    b = torch.randint(0, vocab, (n, 1), generator=gen)
    x0 = torch.randint(0, vocab, (n, 1), generator=gen)
    seq = [x0]
    for _ in range(length - 1):
        seq.append((a * seq[-1] + b) % vocab)
    return DataLoader(TensorDataset(torch.cat(seq, 1)), batch_size=32, shuffle=True)


def build(row: str) -> tuple[pl.LightningModule, Any]:
    if row == "quickstart":
        net = MLP(in_features=64, out_features=10, depth=2, width=128, activation="relu")
        return Classifier(net, loss="cross_entropy", lr=0.01, momentum=0.9), DigitsDataModule(
            batch_size=16, val_fraction=0.2, seed=0
        )
    if row == "resnet":
        return Classifier(ResNet(), loss="cross_entropy", lr=0.05, momentum=0.9), (
            DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0)
        )
    if row == "transformer":
        return LM(), tokens()
    if row == "mlp1m":
        net = MLP(in_features=64, out_features=10, depth=2, width=1024, activation="relu")
        return AdamClassifier(net, loss="cross_entropy", lr=1e-3), (
            DigitsDataModule(batch_size=64, val_fraction=0.2, seed=0)
        )
    raise ValueError(row)


def fit(row: str, steps: int, with_callbacks: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, data = build(row)
    cbs: list[Any] = [Sharpness(), HessianEigenvalues()] if with_callbacks else []
    rec = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=rec,
            callbacks=cbs,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=tmp,
        )
        foreign = ForeignCpu()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(data, DataLoader):
                trainer.fit(model, data)
            else:
                trainer.fit(model, datamodule=data)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        other = foreign.read()["share"]
    out: dict[str, Any] = {"cpu": cpu, "wall": wall, "foreign": other}
    for cb, tag in zip(cbs, ("landscape/sharpness/lambda_max", "landscape/hessian/eig_1")):
        steps_logged = sorted(rec.steps.get(tag, []))
        out[cb.family] = {
            "points": len(steps_logged),
            "second": steps_logged[1] if len(steps_logged) > 1 else None,
            "probe": cb.plan_summary.get("probe_size"),
            "seconds": cb.seconds,
            "first": cb.run_summary.get("first_seconds"),
            "dispatch": cb.run_summary.get("dispatch_seconds"),
            "share": cb.run_summary.get("share"),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", type=int, default=1000)
    parser.add_argument("--long", type=int, default=10000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--long-pairs", type=int, default=1)
    parser.add_argument("--rows", default="quickstart,resnet,transformer,mlp1m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "rows": {}}
    print(describe(results["machine"]))
    fit("quickstart", 20, False)  # warm-up (imports, allocator)
    table = []
    for row in args.rows.split(","):
        for length, steps, pairs in (
            ("short", args.short, args.pairs),
            ("long", args.long, args.long_pairs),
        ):
            if steps <= 0 or pairs <= 0:  # --long 0: short rows only
                continue
            runs = []
            for i in range(pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                pair = {w: fit(row, steps, w) for w in order}
                runs.append(pair)
            cpu = median([p[True]["cpu"] / p[False]["cpu"] for p in runs])
            wall = median([p[True]["wall"] / p[False]["wall"] for p in runs])
            busy = max(max(p[True]["foreign"], p[False]["foreign"]) for p in runs)
            last = runs[-1][True]
            results["rows"][f"{row}/{length}"] = runs
            table.append((row, length, steps, last["sharpness"], last["hessian"], cpu, wall, busy))
            print(table[-1], flush=True)
    save("cadence", results)
    print(
        "\n| model | run | steps | probe | Sharpness points | 2nd point | Hessian points | "
        "2nd point | cold step-0 point (S + H) | accounted share (S + H) | CPU-time overhead | "
        "wall overhead | other processes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, length, steps, s, h, cpu, wall, busy in table:
        print(
            f"| {row} | {length} | {steps} | {s['probe']} | {s['points']} | {s['second']} | "
            f"{h['points']} | {h['second']} | {s['first']:.2f} + {h['first']:.2f} s | "
            f"{100 * s['share']:.1f} + {100 * h['share']:.1f}% | {100 * (cpu - 1):+.1f}% | "
            f"{100 * (wall - 1):+.1f}% | {100 * busy:.0f}% |"
        )


if __name__ == "__main__":
    main()
