"""Sample variance under DDP (2 and 3 gloo processes, unequal shards) equals the union.

- pure torch: each spawned rank measures its own shard (7, 11, 4 samples of a Conv2d + Linear
  float64 net, probe batches of at most 3); every rank gets bit-identical fractions equal to one
  process on the union, and a NaN on one rank makes every rank raise and stay in step;
- Lightning: ``SampleVarianceDecay`` with DDP logs at step 0 the single-process value on the
  union of the ranks' probe shards, the same on every rank (the launch helpers of
  ``tests/test_ddp.py`` are reused).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_landscape.callbacks.sample_variance import SampleVarianceDecay
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.variance import sample_variance

from . import ddp_workers, test_ddp, variance_workers
from .ddp_workers import SHARDS, one_thread, spawn
from .test_ddp import PROBE, _dataset, _fit, _loss, _Module, _same_on_every_rank, _union_indices
from .variance_workers import images, measure, variance_worker

WORLDS = [2, 3]


@pytest.fixture(scope="module", autouse=True)
def _preload() -> None:
    modules = [ddp_workers.__name__, variance_workers.__name__, test_ddp.__name__, __name__]
    multiprocessing.set_forkserver_preload(modules)


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with one_thread():
        yield


@pytest.mark.parametrize("world", WORLDS)
def test_shards_equal_the_union(world: int, tmp_path: Path) -> None:
    spawn(variance_worker, (world, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in ranks[0]:  # bit-identical on every rank
        for r in range(1, world):
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)
    union = measure(images(sum(SHARDS[:world])))
    got = ranks[0]
    assert torch.equal(got["num_samples"], union["num_samples"])
    n = sum(SHARDS[:world])
    assert got["num_samples"].tolist() == [16 * n, n, n]  # conv: 4x4 positions per sample
    for name in ("fractions", "variance", "second_moment", "last_over_first"):
        torch.testing.assert_close(got[name], union[name], rtol=1e-12, atol=0.0, msg=name)
    # the test can fail: one rank's shard alone gives other fractions
    alone = measure(images(sum(SHARDS[:world]))[: SHARDS[0]])
    assert (alone["fractions"] - union["fractions"]).abs().max() > 1e-3
    assert all(int(rk["nan_raised"]) == 1 for rk in ranks)
    assert all(float(rk["alive"]) == world for rk in ranks)


@pytest.mark.parametrize("world", WORLDS)
def test_callback_logs_the_union(world: int, tmp_path: Path) -> None:
    cb = SampleVarianceDecay(every_n_steps=100, probe_size=PROBE, probe_batch_size=2)
    reference = _Module()  # the same initial weights as the model the ranks train
    x, y = _dataset().tensors
    idx = _union_indices(world, PROBE)
    union = Probe.from_samples((x[idx], y[idx]), batch_size=4)
    expected = sample_variance(reference, union, forward=_loss)
    _, logged = _fit(world, tmp_path, [cb], max_steps=1)
    step0 = _same_on_every_rank(logged)[0]
    base = "landscape/sample_variance/"
    assert list(step0) == [base + "net.0", base + "net.2", base + "last_over_first"]
    for name, value in expected.as_dict().items():
        assert step0[base + name] == pytest.approx(value, rel=1e-12), name
    assert step0[base + "last_over_first"] == pytest.approx(expected.last_over_first, rel=1e-12)
