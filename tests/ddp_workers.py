"""Pieces of the DDP tests without Lightning: launchers, tiny float64 model, shards, the worker.

Kept free of Lightning so a child imports it in about two seconds (the children of a spawn-type
start re-import the module of the function they run; Lightning alone takes ~5 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_landscape.measures.diagonal import hutchinson_diagonal
from lightning_landscape.measures.eigen import hutchpp_trace, slq_density, top_eigen
from lightning_landscape.measures.operators import NonFiniteError, ProbeHessian
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.sharpness import preconditioned_lambda_max, rho_sharpness

SHARDS = (7, 11, 4)  # samples per rank: unequal on purpose
PROBE_BATCH = 3  # shard batches (3,2,2), (3,3,3,2), (2,2): batch sizes matter
N_PARAMS = 26  # Linear(3, 4) + Linear(4, 2)
BLOCK = ["0.weight", "2.bias"]  # a Hessian block: 12 + 2 parameters
TIMEOUT = 180.0  # seconds before a launch counts as a deadlock
# Ranks fork from a server process that imported the test modules (and Lightning) once. With
# "spawn" every child spends ~7 s importing Lightning (the DDP tests took 130 s on 2 cores
# instead of ~25 s). Both start clean interpreters, unlike strategy="ddp", which would re-run
# the pytest command in each child. The tests pass with "spawn" too.
START: Literal["forkserver", "spawn"] = "forkserver"


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 2, (n,), generator=gen)


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None
) -> torch.Tensor:
    """Exact Hessian of the mean loss on ``(x, y)`` w.r.t. the named (default: all) parameters."""
    named = dict(model.named_parameters())
    names = names or list(named)
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, off = {}, 0
        for n in names:
            params[n] = flat[off : off + named[n].numel()].view_as(named[n])
            off += named[n].numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Single-threaded torch (tiny models run ~20x slower with threads fighting for 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[threading.Event]:
    """Kill the child processes started inside the block if it outlives ``seconds``."""
    before = set(multiprocessing.active_children())
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        for child in set(multiprocessing.active_children()) - before:
            child.kill()

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, folder: str) -> Iterator[None]:
    """In a spawned child: one torch thread, join the gloo group of ``world`` ranks through a
    file in ``folder`` (collectives time out before the launcher's deadline), leave it on exit."""
    torch.set_num_threads(1)
    # a rank still alive shortly before the launcher's deadline prints where it is stuck
    faulthandler.dump_traceback_later(TIMEOUT - 20, exit=True, file=sys.stderr)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT / 2),
    )
    try:
        yield
        # every rank is done with the group before any tears it down (a rank leaving while
        # another still talks to it can abort or hang the other at exit)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def run_and_exit(rank: int, fn: Callable[..., None], *args: Any) -> None:
    """In a spawned child: ``fn(rank, *args)``, then leave at once with exit code 0.

    A child that returns normally tears the interpreter down, and with it gloo's C++ objects;
    one of them sometimes still owned a running thread and aborted the process ("terminate
    called without an active exception", SIGABRT, about 1 run in 10 even after a barrier) or
    hung it at exit. The results are written (and the group left) before this point, so
    skipping that teardown loses nothing. An exception still propagates: torch's spawn wrapper
    reports it and exits with 1."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], args: tuple[Any, ...], world: int) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned processes; fail on error or deadlock."""
    start = time.monotonic()
    ctx = torch.multiprocessing.start_processes(
        run_and_exit, args=(fn, *args), nprocs=world, join=False, start_method=START
    )
    while not ctx.join(timeout=0.5):  # raises if a child raised
        if time.monotonic() - start > TIMEOUT:
            for proc in ctx.processes:
                proc.kill()
                proc.join(10)
            pytest.fail(f"{world} processes did not finish within {TIMEOUT} s (deadlock?)")


def vectors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed direction ``v`` and a fixed positive diagonal preconditioner."""
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(size, generator=gen, dtype=torch.float64)
    return v, torch.rand(size, generator=gen, dtype=torch.float64) + 0.5


def _f64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def measure_all(model: nn.Module, probe: Probe) -> dict[str, torch.Tensor]:
    """Every probe measure, in a fixed order (identical collectives on every rank)."""
    out: dict[str, torch.Tensor] = {}
    op = ProbeHessian(model, probe, ce)
    v, diag = vectors(op.size)
    out["num_samples"] = torch.tensor(op.num_samples)
    out["hv"] = op.matvec(v)
    out["hv_no_reuse"] = ProbeHessian(model, probe, ce, reuse_graph=False).matvec(v)
    block = ProbeHessian(model, probe, ce, params=BLOCK)
    out["hv_block"] = block.matvec(v[: block.size])
    out["loss"] = _f64(op.loss())
    loss, grad = op.loss_and_gradient()
    out["loss_g"], out["grad"] = _f64(loss), grad
    est = top_eigen(op, k=3, bottom=True, tol=1e-10, max_iter=N_PARAMS)
    out["eig"], out["eig_min"] = est.eigenvalues, _f64(est.lambda_min)
    out["eig_early"] = top_eigen(op, k=1, tol=1e-2, max_iter=6).eigenvalues  # stops early
    out["trace"] = _f64(hutchpp_trace(op, matvecs=12, seed=3).estimate)
    out["diag"] = hutchinson_diagonal(op, samples=3)
    out["slq"] = torch.tensor(slq_density(op, runs=2, lanczos_steps=8).nodes, dtype=torch.float64)
    out["pre"] = preconditioned_lambda_max(op, diag, tol=1e-10, max_iter=N_PARAMS).eigenvalues
    out["rho"] = _f64(rho_sharpness(op, 0.1, steps=3).value)
    out["rho_adaptive"] = _f64(rho_sharpness(op, 0.1, steps=3, adaptive=True).value)
    out["params_after"] = op.vector()
    return out


def shard(rank: int, world: int, nan_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s samples of the union ``data(sum(SHARDS[:world]))`` (a NaN on ``nan_rank``)."""
    x, y = data(sum(SHARDS[:world]))
    start = sum(SHARDS[:rank])
    x, y = x[start : start + SHARDS[rank]].clone(), y[start : start + SHARDS[rank]]
    if rank == nan_rank:
        x[SHARDS[rank] // 2, 1] = float("nan")
    return x, y


def _nan_checks(model: nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """With a NaN sample on rank 1 only, every rank must raise, and stay in step."""
    probe = Probe.from_samples(shard(rank, world, nan_rank=1), batch_size=PROBE_BATCH)
    bad = ProbeHessian(model, probe, ce)
    calls: dict[str, Callable[[], Any]] = {
        "loss": bad.loss,
        "matvec": lambda: bad.matvec(torch.ones(bad.size, dtype=torch.float64)),
        "gradient": bad.loss_and_gradient,
        "lanczos": lambda: top_eigen(bad, k=2),
        "trace": lambda: hutchpp_trace(bad, matvecs=6),
        "rho": lambda: rho_sharpness(bad, 0.1),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[f"nan_{name}"] = torch.tensor(0)
        except NonFiniteError:
            out[f"nan_{name}"] = torch.tensor(1)
    alive = torch.ones(1)
    dist.all_reduce(alive)  # every rank ran the same collectives: this one completes
    out["alive"] = alive
    return out


def torch_worker(rank: int, world: int, folder: str) -> None:
    """Spawned child: join a gloo group, measure this rank's shard, save to ``rank<r>.pt``."""
    start = time.perf_counter()
    with gloo_group(rank, world, folder):
        model = mlp()
        out = measure_all(model, Probe.from_samples(shard(rank, world), batch_size=PROBE_BATCH))
        out.update(_nan_checks(model, rank, world))
        out["seconds"] = _f64(time.perf_counter() - start)
        torch.save(out, f"{folder}/rank{rank}.pt")
