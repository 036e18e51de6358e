"""K-FAC under DDP equals one process on the union batch (2 and 3 gloo processes).

- pure torch (``tests/kfac_ddp_workers.py``): factors and preconditioned gradients on unequal
  shards; parameters and factors after several DDP steps (``DistributedDataParallel`` wrapper,
  KL clipping, momentum), with the eigendecompositions distributed over the ranks or not, and
  with two accumulated micro-batches per step; every rank holds the same values;
- Lightning: the ``KFAC`` callback with ``strategy="ddp"`` (spawned ranks) lands on the
  parameters of the plain loop on the union of the ranks' batches.

The launch helpers (forkserver, deadlines) are those of ``tests/test_ddp.py``.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_landscape.callbacks.kfac import KFAC
from lightning_landscape.optim.kfac import KFACPreconditioner

from . import ddp_workers, kfac_ddp_workers
from .ddp_workers import START, TIMEOUT, deadline, one_thread, spawn
from .kfac_ddp_workers import HYPER, cnn, factors_scenario, kfac_worker, pack, train

WORLDS = [2, 3]
CLOSE = dict(rtol=1e-11, atol=1e-13)


@pytest.fixture(scope="module", autouse=True)
def _preload() -> None:
    multiprocessing.set_forkserver_preload(
        [ddp_workers.__name__, kfac_ddp_workers.__name__, __name__]
    )


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with one_thread():
        yield


@pytest.mark.parametrize("world", WORLDS)
def test_kfac_ddp_equals_the_union(world: int, tmp_path: Path) -> None:
    spawn(kfac_worker, (world, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    union = factors_scenario(None, world)
    for label, kw in (("steps", {}), ("accumulate", {"micro": 2})):
        union.update(pack(label, *train(cnn(), world, None, **kw)))  # type: ignore[arg-type]
    union.update({"distributed" + k[5:]: v for k, v in union.items() if k.startswith("steps_")})
    assert any(k.startswith("A") for k in union) and any(k.startswith("steps_G") for k in union)
    for name, want in union.items():
        for r in range(world):
            torch.testing.assert_close(ranks[r][name], want, **CLOSE, msg=f"{name} rank {r}")
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)  # identical ranks
    # the test can fail: each rank's own factors differ from the union's
    own = KFACPreconditioner(cnn(), factor_update_every=1, kl_clip=None)
    x, y = kfac_ddp_workers.unequal_shard(0, world)
    F.cross_entropy(own.model(x), y).backward()
    own.step()
    assert not torch.allclose(own.factors()["3"][1], union["G3"], rtol=1e-3)


# -- Lightning ----------------------------------------------------------------------------------
N_DATA, BATCH, MAX_STEPS = 24, 3, 4


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)
        os.environ["PL_GLOBAL_SEED"] = "0"
        with torch.no_grad():  # un-share the storage the forkserver launcher pickled
            for p in self.parameters():
                p.data = p.data.clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "p.pt"
            torch.save([p.detach() for p in self.parameters()], path)


def _dataset() -> TensorDataset:
    return TensorDataset(*kfac_ddp_workers.union_data(N_DATA, seed=7))


def _reference(world: int) -> list[torch.Tensor]:
    """The plain loop on the union of the ranks' batches (Lightning's shuffling sampler)."""
    x, y = _dataset().tensors
    orders = [list(DistributedSampler(_dataset(), num_replicas=world, rank=r, seed=0))
              for r in range(world)]  # fmt: skip
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt, **HYPER)
    for step in range(MAX_STEPS):
        idx = torch.tensor([i for o in orders for i in o[step * BATCH : (step + 1) * BATCH]])
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        pre.step()
        opt.step()
    return [p.detach() for p in model.parameters()]


def test_lightning_kfac_ddp_equals_the_union(tmp_path: Path) -> None:
    world = 2
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, max_steps=MAX_STEPS, default_root_dir=str(tmp_path),
        strategy=DDPStrategy(start_method=START, timeout=datetime.timedelta(seconds=TIMEOUT)),
        callbacks=[KFAC(**HYPER)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(_dataset(), batch_size=BATCH, shuffle=False)
    with deadline(TIMEOUT) as fired:
        try:
            trainer.fit(_Module(), loader)
        except Exception:
            if fired.is_set():
                pytest.fail(f"DDP with {world} ranks did not finish within {TIMEOUT} s")
            raise
    got = torch.load(tmp_path / "p.pt")
    for p, q in zip(got, _reference(world)):
        torch.testing.assert_close(p, q, **CLOSE)
