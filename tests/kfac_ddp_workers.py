"""K-FAC DDP workers without Lightning: every rank trains on its shard, results go to files.

Imported by the forkserver children of ``tests/test_kfac_ddp.py`` (kept free of Lightning so a
child starts in about two seconds; the launch helpers come from ``tests/ddp_workers.py``).
Three scenarios per launch, all in float64 on a tiny CNN (Conv2d + Linear):

- ``factors``: unequal shards (7, 11, 4 samples), one step; the gradients are averaged by
  sample count by hand (the union mean), so factors *and* preconditioned gradients must equal
  one process on the union;
- ``steps``: ``DistributedDataParallel`` (unwrapped by the preconditioner), equal shards, SGD
  with momentum and KL clipping, ``STEPS`` steps; with ``distribute_inverses`` on and off;
- ``accumulate``: the same with two micro-batches per step (``no_sync`` on the first).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner

from .ddp_workers import gloo_group

UNEQUAL = (7, 11, 4)
EQUAL = 4  # samples per rank and step in the DDP scenarios
STEPS = 5
HYPER = dict(damping=0.03, factor_update_every=2, inverse_update_every=3, kl_clip=1e-3)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def union_data(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=gen),
    )


def unequal_shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = union_data(sum(UNEQUAL[:world]))
    start = sum(UNEQUAL[:rank])
    return x[start : start + UNEQUAL[rank]], y[start : start + UNEQUAL[rank]]


def step_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union batch of ``step`` (rank ``r`` holds rows ``r·EQUAL … (r+1)·EQUAL``)."""
    return union_data(world * EQUAL, seed=100 + step)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def train(
    model: nn.Module,
    world: int,
    rank: int | None,
    *,
    distribute: bool = False,
    micro: int = 1,
) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``STEPS`` K-FAC + SGD steps; ``rank=None`` runs one process on the union batches."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(inner.parameters(), lr=0.2, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt, distribute_inverses=distribute, **HYPER)
    for step in range(STEPS):
        x, y = step_batch(step, world)
        if rank is not None:
            x, y = x[rank * EQUAL : (rank + 1) * EQUAL], y[rank * EQUAL : (rank + 1) * EQUAL]
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro), y.chunk(micro)))
        for i, (xc, yc) in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = not last and isinstance(model, nn.parallel.DistributedDataParallel)
            with model.no_sync() if sync else contextlib.nullcontext():  # type: ignore[operator]
                (F.cross_entropy(model(xc), yc) / micro).backward()
        pre.step()
        opt.step()
    return [p.detach().clone() for p in inner.parameters()], pre.factors()


def factors_scenario(rank: int | None, world: int) -> dict[str, torch.Tensor]:
    """One step on unequal shards with union-mean gradients (``rank=None``: the union)."""
    model = cnn()
    pre = KFACPreconditioner(model, damping=0.03, factor_update_every=1, kl_clip=None)
    if rank is None:
        x, y = union_data(sum(UNEQUAL[:world]))
    else:
        x, y = unequal_shard(rank, world)
    F.cross_entropy(model(x), y).backward()
    if rank is not None:  # the union mean: Σ_r N_r g_r / Σ_r N_r
        for p in model.parameters():
            p.grad.mul_(x.shape[0] / sum(UNEQUAL[:world]))  # type: ignore[union-attr]
            dist.all_reduce(p.grad)  # type: ignore[arg-type]
    pre.step()
    out = {f"grad{i}": g for i, g in enumerate(grads_of(model))}
    for name, (a, g) in pre.factors().items():
        out[f"A{name}"], out[f"G{name}"] = a, g
    return out


def pack(prefix: str, params: list[torch.Tensor], factors: dict) -> dict[str, torch.Tensor]:
    out = {f"{prefix}_param{i}": p for i, p in enumerate(params)}
    for name, (a, g) in factors.items():
        out[f"{prefix}_A{name}"], out[f"{prefix}_G{name}"] = a, g
    return out


def kfac_worker(rank: int, world: int, folder: str) -> None:
    """Spawned child: join a gloo group, run every scenario, save ``rank<r>.pt``."""
    start = time.perf_counter()
    with gloo_group(rank, world, folder):
        out = factors_scenario(rank, world)
        for label, kw in (("steps", {}), ("distributed", {"distribute": True}),
                          ("accumulate", {"micro": 2})):  # fmt: skip
            ddp = nn.parallel.DistributedDataParallel(cnn())
            out.update(pack(label, *train(ddp, world, rank, **kw)))  # type: ignore[arg-type]
        out["seconds"] = torch.tensor(time.perf_counter() - start)
        torch.save(out, f"{folder}/rank{rank}.pt")
