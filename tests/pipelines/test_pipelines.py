"""Pipeline conformance: the callbacks never break a user's fit on the models people train.

Rows (``models.PIPELINES``): ``nn.MultiheadAttention`` classifier, ``nn.TransformerEncoderLayer``
causal LM, a hand-written GPT block on ``F.scaled_dot_product_attention(is_causal=True)``,
Hugging Face GPT-2 and BERT from tiny configs, a ResNet-style CNN (bias-free convs, BatchNorm,
in-place ReLU and residual adds), an MLP with two AdamW parameter groups in ``bf16-mixed``, an
LSTM classifier (with gradient clipping), two ``torch.compile`` variants, and DDP through
Lightning's ``strategy="ddp"`` on 2 CPU processes (``ddp_pipeline.py``, run as a script).

Columns (``conformance.COLUMNS``): every measurement callback at its defaults plus the common
options, all on one Trainer per row, checked per callback against a fit without callbacks (see
``conformance.py`` for the checks).

Independent reference: on float64 instances of rows 1–4 small enough for a dense Hessian,
``landscape/sharpness/lambda_max`` at steps 0 and 1 equals the largest eigenvalue of
``torch.autograd.functional.hessian`` of the probe loss (via ``torch.func.functional_call`` on
the flattened parameters, eval mode, math SDPA backend).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_landscape.callbacks import Sharpness

from .conformance import MemoryLogger, failures, fit, make_columns
from .models import PIPELINES, TINY, Pipeline, PipelineModule, loader

REPO = Path(__file__).resolve().parents[2]
DDP_TIMEOUT = 150.0  # seconds; the DDP row takes ~30 s on 2 cores


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.id for p in PIPELINES])
def test_callbacks_conform(pipeline: Pipeline, tmp_path: Path) -> None:
    for module in pipeline.needs:
        pytest.importorskip(module)
    reason = pipeline.unavailable()
    if reason is not None:
        pytest.skip(reason)
    ref = fit(pipeline, [], str(tmp_path / "reference"))
    got = fit(pipeline, make_columns(), str(tmp_path / "callbacks"))
    problems = failures(ref, got)
    assert not problems, f"{pipeline.id}:\n  " + "\n  ".join(problems)


def test_ddp_pipeline(tmp_path: Path) -> None:
    """Row 9: ``strategy="ddp"`` (2 CPU processes, gloo) in a fresh interpreter.

    Under pytest ``strategy="ddp"`` would re-run the pytest command in the child process, so
    the fits run in ``ddp_pipeline.py``; each rank writes its check results to ``tmp_path``.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"}
    }  # fmt: skip
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on a timeout dumps every rank's stack
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.pipelines.ddp_pipeline", str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the rank Lightning starts joins this group: one kill for both
    )
    try:
        output, _ = proc.communicate(timeout=DDP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            output, _ = proc.communicate(timeout=15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the other rank, if it outlived the dump
        pytest.fail(f"the DDP pipeline did not finish within {DDP_TIMEOUT} s:\n{output[-8000:]}")
    assert proc.returncode == 0, output[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r, result in enumerate(ranks):
        assert not result["failures"], f"rank {r}:\n  " + "\n  ".join(result["failures"])
    assert ranks[0]["landscape"] == ranks[1]["landscape"], "ranks logged other steps or values"


# -- independent reference for the attention rows ---------------------------------------------
class _LossOf(nn.Module):
    def __init__(self, module: PipelineModule) -> None:
        super().__init__()
        self.m = module

    def forward(self, batch: Any) -> torch.Tensor:
        return self.m.loss(batch)


def dense_lambda_max(module: PipelineModule, batch: Any) -> float:
    """λ_max of the dense Hessian of ``module.loss(batch)`` in eval mode, math SDPA backend."""
    wrapper = _LossOf(copy.deepcopy(module).eval())
    named = {n: p.detach() for n, p in wrapper.named_parameters()}  # tied weights once
    flat0 = torch.cat([p.reshape(-1) for p in named.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named.items():
            params[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(wrapper, params, (batch,))

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss, flat0)
    torch.testing.assert_close(hessian, hessian.T, rtol=1e-9, atol=1e-12)
    return float(torch.linalg.eigvalsh(hessian)[-1])


@pytest.mark.parametrize("row", list(TINY))
def test_sharpness_matches_the_dense_hessian(row: str, tmp_path: Path) -> None:
    if row.startswith("hf_"):
        pytest.importorskip("transformers")
    make, data = TINY[row]
    pl.seed_everything(0, verbose=False)
    module = make(tiny=True).double()
    initial = copy.deepcopy(module)
    dataset = data(tiny=True)
    n, n_params = len(dataset), sum(p.numel() for p in module.parameters())
    assert n_params <= 400, n_params  # dense Hessian in about a second
    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision="64-true",
        logger=logger,
        callbacks=[Sharpness(every_n_steps=1, probe_size=n, tol=1e-6, max_iter=n_params)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader(dataset, batch_size=4))
    lam = {
        s: m["landscape/sharpness/lambda_max"]
        for s, m in logger.records
        if "landscape/sharpness/lambda_max" in m
    }
    assert sorted(lam) == [0, 1]
    batch = tuple(t.double() if t.is_floating_point() else t for t in dataset.tensors)
    for step, weights in ((0, initial), (1, module)):  # θ_0, and θ_1 after one optimizer step
        expected = dense_lambda_max(weights, batch)
        assert lam[step] == pytest.approx(expected, rel=1e-5, abs=1e-9), (row, step)
