"""Loss landscape under DDP: every rank's result equals one process on the union of the shards.

- pure torch (2 and 3 gloo processes, unequal shards of 7, 11, 4 samples): surfaces, a line
  and the interpolation from θ0 equal the single-process values on the union, bit-identical
  on every rank, with one all-reduce per chunk of grid points;
- Lightning (2 and 3 DDP ranks): ``LossLandscape(at_end=True)`` runs on every rank together in
  ``on_train_end``; the barrier every rank logs and the grid rank 0 saves equal the
  single-process reference on the union probe at the final weights.

Ranks start as fresh interpreters (``forkserver``, see :mod:`tests.ddp_workers`).
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks.landscape import LossLandscape
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.landscape import (
    filter_normalized_directions,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe

from . import ddp_workers, landscape_workers
from .ddp_workers import SHARDS, START, TIMEOUT, ce, data, deadline, mlp, one_thread, spawn
from .landscape_workers import CHUNK, RESOLUTION, landscape_all, landscape_worker

WORLDS = [2, 3]


@pytest.fixture(scope="module", autouse=True)
def _preload() -> None:
    multiprocessing.set_forkserver_preload(
        [ddp_workers.__name__, landscape_workers.__name__, __name__]
    )


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with one_thread():
        yield


@pytest.mark.parametrize("world", WORLDS)
def test_landscape_equals_the_union(world: int, tmp_path: Path) -> None:
    spawn(landscape_worker, (world, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, y = data(sum(SHARDS[:world]))
    union = landscape_all(mlp(), Probe.from_samples((x, y), batch_size=5))
    for name in union:
        if name in ("reductions", "seconds"):
            continue
        for r in range(1, world):
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)
        torch.testing.assert_close(ranks[0][name], union[name], rtol=1e-12, atol=1e-14, msg=name)
    assert int(union["reductions"]) == 0  # one process: nothing to reduce
    assert all(int(rk["reductions"]) == math.ceil((RESOLUTION**2 + 1) / CHUNK) for rk in ranks)
    assert torch.equal(ranks[0]["params_after"], union["params_after"])
    assert float(union["barrier"]) >= 0.0
    # the test can fail: the mean of the ranks' own losses (unweighted) is not the union's
    shards = [ddp_workers.shard(r, world) for r in range(world)]
    with torch.no_grad():
        naive = sum(float(ce(mlp(), s)) for s in shards) / world
    assert abs(naive - float(union["center"])) > 1e-4


# -- Lightning -------------------------------------------------------------------------------
N_DATA = 24
PROBE = 13  # shards of 7/6 (2 ranks) or 5/4/4 (3 ranks) of the first 13 samples
RES, INTERP = 3, 5


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)
        with torch.no_grad():  # un-share the parameters the launcher put in shared memory
            for p in self.parameters():
                p.data = p.data.clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = ce(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _FileLogger(Logger):
    """Appends this rank's ``log_metrics`` calls to ``<folder>/rank<r>.jsonl``."""

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


def _dataset() -> TensorDataset:
    return TensorDataset(*data(N_DATA, seed=2))


def _reference(initial: _Module, final: _Module) -> dict[str, Any]:
    """One process, the union probe (the first PROBE samples of the probe loader)."""
    x, y = _dataset().tensors
    probe = Probe.from_samples((x[:PROBE], y[:PROBE]), batch_size=4)
    op = ProbeHessian(final, probe, lambda m, b: ce(m.net, b))
    theta0 = torch.cat([p.detach().reshape(-1) for p in initial.parameters()])
    with guard(final, bn="batch", seed=0):
        dirs = filter_normalized_directions(op.parameters, count=2, seed=0)
        surface = loss_surface(op, dirs, resolution=RES)
        interp = linear_interpolation(op, theta0, resolution=INTERP)
    return {"losses": surface.losses.numpy(), "barrier": interp.barrier}


@pytest.mark.parametrize("world", WORLDS)
def test_callback_at_end_logs_the_union_on_every_rank(world: int, tmp_path: Path) -> None:
    probe_loader = DataLoader(
        _dataset(), batch_size=5, shuffle=False
    )  # unsharded: union = first 13
    cb = LossLandscape(
        resolution=RES,
        interpolation_resolution=INTERP,
        probe_size=PROBE,
        probe_batch_size=2,
        probe_dataloader=probe_loader,
        chunk_size=4,
    )
    model = _Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(start_method=START, timeout=datetime.timedelta(seconds=TIMEOUT)),
        max_steps=3,
        callbacks=[cb],
        logger=_FileLogger(str(tmp_path)),
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with deadline(TIMEOUT) as fired:
        try:
            trainer.fit(model, DataLoader(_dataset(), batch_size=4, shuffle=False))
        except Exception:
            if fired.is_set():
                pytest.fail(f"DDP with {world} ranks did not finish within {TIMEOUT} s")
            raise
    logged = []
    for r in range(world):
        lines = (tmp_path / f"rank{r}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        logged.append(
            {
                rec["step"]: rec["metrics"]
                for rec in records
                if "landscape/landscape/barrier" in rec["metrics"]
            }
        )
    assert all(rank == logged[0] for rank in logged)  # every rank, same steps, same values
    assert list(logged[0]) == [3]
    expected = _reference(_Module(), model)  # the parent's model holds rank 0's final weights
    assert logged[0][3]["landscape/landscape/barrier"] == pytest.approx(
        expected["barrier"], rel=1e-10, abs=1e-12
    )
    saved = np.load(tmp_path / "landscape_step3.npz")
    np.testing.assert_allclose(saved["losses"], expected["losses"], rtol=1e-12)
    assert int(saved["step"]) == 3 and saved["interpolation"].shape == (INTERP,)
    assert [p.name for p in tmp_path.glob("*.npz")] == ["landscape_step3.npz"]
    assert os.path.exists(tmp_path / "rank0.jsonl")
