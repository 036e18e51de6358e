"""Distributed invariant: DDP on unequal shards equals one process on the union of the shards.

Two levels, each with 2 and 3 CPU processes (gloo):

- pure torch: spawned children join a gloo group; each builds a :class:`Probe` from its own
  shard (7, 11, 4 samples, probe batches of at most 3, so weighting batches by size matters)
  and every measure (products, loss, gradient, Lanczos, Hutch++, Hutchinson, SLQ,
  preconditioned λ_max, ρ-sharpness) equals the single-process value on the union, is
  bit-identical across ranks and matches the dense float64 Hessian; a NaN sample on rank 1 only
  makes every rank raise, and the ranks stay in step;
- Lightning: DDP with spawned ranks, ``Sharpness`` + ``HessianEigenvalues``; the values logged at
  steps 0 and 1 equal single-process references on the union of the ranks' probe shards, every
  rank logs the same values at the same steps, the time-budget cadence does not deadlock, and a
  NaN in one rank's probe makes every rank skip while training goes on.

``strategy="ddp"`` would re-run the pytest command in each child, so ranks are started as
fresh interpreters (``forkserver``, see ``START``); callback state does not come back to the
parent, so each rank's logger writes its metrics to a file. Every launch runs under a deadline
that kills the children it started, and gloo collectives time out as well.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.measures.diagonal import hutchinson_diagonal
from lightning_landscape.measures.eigen import hutchpp_trace, top_eigen
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.sharpness import rho_sharpness

from . import ddp_workers
from .ddp_workers import (
    BLOCK,
    N_PARAMS,
    PROBE_BATCH,
    SHARDS,
    START,
    TIMEOUT,
    ce,
    data,
    deadline,
    dense_hessian,
    measure_all,
    mlp,
    one_thread,
    shard,
    spawn,
    torch_worker,
    vectors,
)

WORLDS = [2, 3]


@pytest.fixture(scope="module", autouse=True)
def _preload() -> None:
    multiprocessing.set_forkserver_preload([ddp_workers.__name__, __name__])


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned children
    monkeypatch.delenv("MASTER_PORT", raising=False)  # the Lightning launcher sets it here
    with one_thread():
        yield


# -- level 1: pure torch ----------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
def test_measures_equal_the_union(world: int, tmp_path: Path) -> None:
    spawn(torch_worker, (world, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = mlp()
    x, y = data(sum(SHARDS[:world]))
    union = measure_all(model, Probe.from_samples((x, y), batch_size=5))
    for name in union:  # every rank holds bit-identical results
        for r in range(1, world):
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)
    got = ranks[0]
    assert int(got["num_samples"]) == x.shape[0]
    for name, ref in union.items():  # distributed == one process on the union
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(got["params_after"], union["params_after"])  # ρ-sharpness restored θ
    # dense float64 ground truth
    h = dense_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h)
    v, diag = vectors(N_PARAMS)
    torch.testing.assert_close(got["hv"], h @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["hv_no_reuse"], h @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["eig"], evals.flip(0)[:3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["eig_min"], evals[0], rtol=1e-10, atol=1e-12)
    block = dense_hessian(model, x, y, BLOCK)
    torch.testing.assert_close(got["hv_block"], block @ v[:14], rtol=1e-12, atol=1e-12)
    pre = torch.linalg.eigvalsh(diag.rsqrt()[:, None] * h * diag.rsqrt()[None, :])[-1]
    torch.testing.assert_close(got["pre"][0], pre, rtol=1e-10, atol=1e-12)
    loss = F.cross_entropy(model(x), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(got["grad"], grad, rtol=1e-12, atol=1e-14)
    # the test can fail: averaging the shards' batch losses uniformly is measurably wrong
    shards = [Probe.from_samples(shard(r, world), batch_size=PROBE_BATCH) for r in range(world)]
    with torch.no_grad():
        naive = torch.stack([ce(model, b) for p in shards for b in p]).mean()
    assert abs(float(naive - loss.detach())) > 1e-3
    # a NaN sample on rank 1 only: every rank skipped every measure, and stayed in step
    for name in ("loss", "matvec", "gradient", "lanczos", "trace", "rho"):
        assert all(int(rk[f"nan_{name}"]) == 1 for rk in ranks), name
    assert all(float(rk["alive"]) == world for rk in ranks)


# -- level 2: Lightning DDP -----------------------------------------------------------------
class _Module(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = mlp()
        self.lr = lr

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)
        os.environ["PL_GLOBAL_SEED"] = "0"  # seed of the DistributedSampler injected next
        # The launcher pickles the model into shared memory; Lightning un-shares it only for
        # "spawn" on CPU. With "forkserver" every rank would step the same storage (a step of
        # world × lr), so un-share here, before DDP and the optimizer see the parameters.
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)  # measurement must silence this
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _FileLogger(Logger):
    """Appends every ``log_metrics`` call of this rank to ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    @property
    def name(self) -> str:
        return "file"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(Path(self.folder) / f"rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


N_DATA = 24  # divisible by 2 and 3: the DistributedSampler pads nothing
PROBE = 13  # global probe size: shards of 7/6 (2 ranks) or 5/4/4 (3 ranks)
Logged = dict[int, dict[int, dict[str, float]]]  # rank -> step -> metrics


def _order(world: int, rank: int) -> list[int]:
    """Rank ``rank``'s sample order in epoch 0: Lightning injects a *shuffling*
    ``DistributedSampler`` (seed ``PL_GLOBAL_SEED``) even for a ``shuffle=False`` loader."""
    return list(DistributedSampler(_dataset(), num_replicas=world, rank=rank, seed=0))


def _union_indices(world: int, probe_size: int) -> torch.Tensor:
    """Samples of the union of the probes: rank r captures the first
    ``probe_size // w + (r < probe_size % w)`` samples of its loader."""
    shares = [probe_size // world + (r < probe_size % world) for r in range(world)]
    return torch.tensor(sorted(i for r in range(world) for i in _order(world, r)[: shares[r]]))


def _dataset(nan_index: int | None = None) -> TensorDataset:
    x, y = data(N_DATA, seed=2)
    if nan_index is not None:
        x[nan_index, 0] = float("nan")
    return TensorDataset(x, y)


def _fit(
    world: int,
    folder: Path,
    callbacks: list[Any],
    *,
    max_steps: int,
    batch_size: int = 4,
    nan_index: int | None = None,
    model: _Module | None = None,
) -> tuple[_Module, Logged]:
    """Fit on ``world`` spawned ranks; the model and every rank's logged metrics."""
    model = model if model is not None else _Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(start_method=START, timeout=datetime.timedelta(seconds=TIMEOUT)),
        max_steps=max_steps,
        callbacks=callbacks,
        logger=_FileLogger(str(folder)),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(_dataset(nan_index), batch_size=batch_size, shuffle=False)
    with deadline(TIMEOUT) as fired:
        try:
            trainer.fit(model, loader)
        except Exception:
            if fired.is_set():
                pytest.fail(f"DDP with {world} ranks did not finish within {TIMEOUT} s (deadlock?)")
            raise
    logged: Logged = {}
    for r in range(world):
        logged[r] = {}
        for line in (folder / f"rank{r}.jsonl").read_text().splitlines():
            record = json.loads(line)
            logged[r].setdefault(record["step"], {}).update(record["metrics"])
    return model, logged


def _landscape(per_step: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """The ``landscape/`` metrics of each step that has any."""
    out = {
        s: {k: v for k, v in m.items() if k.startswith("landscape/")} for s, m in per_step.items()
    }
    return {s: m for s, m in out.items() if m}


def _same_on_every_rank(logged: Logged) -> dict[int, dict[str, float]]:
    first = _landscape(logged[0])
    for r in logged:
        assert _landscape(logged[r]) == first, f"rank {r} logged other steps or values"
    return first


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The training loss of :class:`_Module`, for single-process references."""
    assert isinstance(model, _Module)
    return ce(model.net, batch)


def _union_reference(model: _Module, world: int) -> dict[str, float]:
    """What the callbacks below must log at step 0, computed by one process on the union."""
    x, y = _dataset().tensors
    idx = _union_indices(world, PROBE)
    assert len(idx) == PROBE
    union = Probe.from_samples((x[idx], y[idx]), batch_size=4)
    op = ProbeHessian(model, union, _loss)
    est = top_eigen(op, k=2, bottom=True, tol=1e-10, max_iter=N_PARAMS)
    out = {
        "sharpness/lambda_max": float(est.eigenvalues[0]),
        "sharpness/threshold": 2 / model.lr,
        "sharpness/ratio": float(est.eigenvalues[0]) / (2 / model.lr),
        "sharpness/rho": rho_sharpness(op, 0.05, steps=2).value,
        "hessian/eig_1": float(est.eigenvalues[0]),
        "hessian/eig_2": float(est.eigenvalues[1]),
        "hessian/lambda_min": est.lambda_min,
        "hessian/trace": hutchpp_trace(op, matvecs=3 * N_PARAMS).estimate,
    }
    diagonal = hutchinson_diagonal(op, samples=3).abs()
    for layer, d in (("net.0", diagonal[:16]), ("net.2", diagonal[16:])):
        block = ProbeHessian(model, union, _loss, params=[f"{layer}.weight", f"{layer}.bias"])
        out[f"hessian/{layer}/eig_1"] = top_eigen(block, tol=1e-10, max_iter=20).lambda_max
        out[f"hessian/rmed/{layer}"] = float(d.max() / d.median())
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_callbacks_log_the_union(world: int, tmp_path: Path) -> None:
    common: dict[str, Any] = dict(probe_size=PROBE, probe_batch_size=2, every_n_steps=1, tol=1e-10)
    callbacks = [
        Sharpness(max_iter=N_PARAMS, rho=0.05, rho_steps=2, **common),
        HessianEigenvalues(
            k=2, max_iter=N_PARAMS, trace=True, trace_matvecs=3 * N_PARAMS, per_layer=True,
            rmed=True, rmed_samples=3, **common,
        ),
    ]  # fmt: skip
    reference = _Module()  # the same initial weights as the model the ranks train
    expected = _union_reference(reference, world)
    model, logged = _fit(world, tmp_path, callbacks, max_steps=3)
    metrics = _same_on_every_rank(logged)
    assert sorted(metrics) == [0, 1, 2, 3]
    step0 = metrics[0]
    residuals = {
        "landscape/sharpness/residual",
        "landscape/hessian/residual",
        "landscape/hessian/lambda_min_residual",
    }
    assert set(step0) == {f"landscape/{k}" for k in expected} | residuals
    for key, value in expected.items():
        assert step0[f"landscape/{key}"] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert all(step0[k] < 1e-8 for k in residuals)
    # dense ground truth at step 0, and after one DDP step (SGD on the mean of rank gradients)
    x, y = _dataset().tensors
    idx = _union_indices(world, PROBE)
    evals = torch.linalg.eigvalsh(dense_hessian(reference.net, x[idx], y[idx]))
    assert step0["landscape/hessian/eig_1"] == pytest.approx(float(evals[-1]), rel=1e-10)
    assert step0["landscape/hessian/lambda_min"] == pytest.approx(float(evals[0]), rel=1e-10)
    params = list(reference.parameters())
    batches = [torch.tensor(_order(world, r)[:4]) for r in range(world)]  # each rank's 1st
    grads = [torch.autograd.grad(ce(reference.net, (x[b], y[b])), params) for b in batches]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.sub_(reference.lr * sum(g[i] for g in grads) / world)
    evals = torch.linalg.eigvalsh(dense_hessian(reference.net, x[idx], y[idx]))
    assert metrics[1]["landscape/sharpness/lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-9)
    assert metrics[1]["landscape/hessian/eig_2"] == pytest.approx(float(evals[-2]), rel=1e-9)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("world", WORLDS)
def test_time_budget_cadence_agrees_across_ranks(world: int, tmp_path: Path) -> None:
    """Budget decisions read rank-local clocks; rank 0's are broadcast, so no rank hangs."""
    callbacks = [
        Sharpness(probe_size=N_DATA),
        HessianEigenvalues(k=2, max_overhead=0.5, probe_size=PROBE),
    ]
    _, logged = _fit(world, tmp_path, callbacks, max_steps=12, batch_size=2)
    measured = _same_on_every_rank(logged)
    assert "landscape/sharpness/lambda_max" in measured[0]
    assert "landscape/hessian/eig_1" in measured[0]
    # Sharpness() keeps each rank's whole shard, so its union probe is the dataset
    x, y = _dataset().tensors
    model = _Module()
    op = ProbeHessian(model, Probe.from_samples((x, y)), _loss)
    lam = measured[0]["landscape/sharpness/lambda_max"]
    assert lam == pytest.approx(top_eigen(op, k=1, max_iter=20, tol=1e-3).lambda_max, rel=1e-9)
    assert lam == pytest.approx(
        float(torch.linalg.eigvalsh(dense_hessian(model.net, x, y))[-1]), rel=1e-4
    )


@pytest.mark.parametrize("world", WORLDS)
def test_nan_on_one_rank_skips_on_every_rank(world: int, tmp_path: Path) -> None:
    # rank 1's 8th sample is in its probe (12 or 8 samples) but never reaches training (3 steps
    # of 2 samples per rank)
    callbacks = [
        Sharpness(every_n_steps=1, probe_size=N_DATA),
        HessianEigenvalues(k=2, every_n_steps=1, probe_size=N_DATA),
    ]
    model, logged = _fit(
        world, tmp_path, callbacks, max_steps=3, batch_size=2, nan_index=_order(world, 1)[7]
    )
    measured = _same_on_every_rank(logged)
    for family in ("sharpness", "hessian"):
        skipped = {s: m.get(f"landscape/{family}/skipped") for s, m in measured.items()}
        # three in a row with one cause: every rank stops measuring together after step 2
        assert skipped == {0: 1.0, 1: 2.0, 2: 3.0}, family
    assert all(len(m) == 2 for m in measured.values())  # nothing but the two skip counters
    for r in range(world):  # training went on, with finite losses on every rank
        losses = [m["train_loss"] for m in logged[r].values() if "train_loss" in m]
        assert len(losses) == 3 and all(v == v for v in losses)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _FailsOnRank1(_Module):
    """Raises inside measurements (eval mode) on rank 1 only, from step ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self.training and self.global_rank == 1 and self.trainer.global_step >= self.at:
            raise RuntimeError("injected failure in the local HVP of rank 1")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("world", WORLDS)
def test_exception_on_one_rank_skips_on_every_rank_without_hanging(
    world: int, tmp_path: Path
) -> None:
    """An exception inside rank 1's local products: the other ranks learn of it through the
    products' own reduction (no rank waits in a collective), every rank skips together, the
    measurement resumes when the failure stops, and training goes on."""
    callbacks = [
        Sharpness(every_n_steps=1, probe_size=N_DATA),
        HessianEigenvalues(k=2, every_n_steps=1, probe_size=N_DATA),
    ]
    _, logged = _fit(
        world, tmp_path, callbacks, max_steps=4, batch_size=2, model=_FailsOnRank1(at=2)
    )
    measured = _same_on_every_rank(logged)
    for family in ("sharpness", "hessian"):
        skipped = {s: m[f"landscape/{family}/skipped"] for s, m in measured.items() if
                   f"landscape/{family}/skipped" in m}  # fmt: skip
        assert skipped == {2: 1.0, 3: 2.0, 4: 3.0}, family
        values = [s for s, m in measured.items() if f"landscape/{family}/eig_1" in m
                  or f"landscape/{family}/lambda_max" in m]  # fmt: skip
        assert values == [0, 1], family
    for r in range(world):
        losses = [m["train_loss"] for m in logged[r].values() if "train_loss" in m]
        assert len(losses) == 4 and all(v == v for v in losses)


@pytest.mark.parametrize("world", WORLDS)
def test_unsharded_probe_dataloader_gives_its_first_samples(world: int, tmp_path: Path) -> None:
    """A plain (not DistributedSampler) probe loader: the union is its first ``probe_size``."""
    x, y = _dataset().tensors
    plain = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)
    cb = Sharpness(
        every_n_steps=100, probe_size=PROBE, probe_dataloader=plain, tol=1e-10, max_iter=N_PARAMS
    )
    reference = _Module()
    union = Probe.from_samples((x[:PROBE], y[:PROBE]), batch_size=4)
    expected = top_eigen(ProbeHessian(reference, union, _loss), tol=1e-10, max_iter=N_PARAMS)
    _, logged = _fit(world, tmp_path, [cb], max_steps=1)
    step0 = _same_on_every_rank(logged)[0]
    assert step0["landscape/sharpness/lambda_max"] == pytest.approx(expected.lambda_max, rel=1e-10)
