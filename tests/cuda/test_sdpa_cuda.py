"""A transformer calling ``F.scaled_dot_product_attention``, measured on CUDA.

On CUDA the fused SDPA kernels (flash, memory-efficient) have no double backward, and in
float32 or under bf16 autocast training uses one of them. The measurement guard switches SDPA to
its math backend for the duration of a measurement, so ``Sharpness`` gives a finite λ_max,
equal to a math-backend float32 solve of the same weights made outside Lightning.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks import Sharpness
from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.operators import ProbeHessian

from ..callbacks.helpers import RecordingLogger, trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB, CTX, WIDTH, HEADS = 32, 16, 32, 4


class TinyGPT(pl.LightningModule):
    """Embedding → one pre-norm block (causal SDPA attention, GELU MLP) → LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CTX, WIDTH)
        self.ln1, self.ln2, self.ln = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(WIDTH, dim=2)
        q, k, v = (z.view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, WIDTH))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(VOCAB, (64, CTX + 1), generator=gen)
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=16, shuffle=True)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_sharpness_of_an_sdpa_transformer_is_finite_on_cuda(precision: str) -> None:
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    pl.seed_everything(0, verbose=False)
    model = TinyGPT()
    cb = Sharpness(every_n_steps=2, probe_size=32, probe_batch_size=16)
    log = RecordingLogger()
    t = trainer(
        [cb], logger=log, accelerator="gpu", devices=1, precision=precision, max_steps=4,
        deterministic=False,
    )  # fmt: skip
    t.fit(model, _loader())
    lam = log.series("landscape/sharpness/lambda_max")
    assert sorted(lam) == [0, 2, 4], log.tags()
    assert all(math.isfinite(v) and v > 0 for v in lam.values()), lam
    assert cb.skipped == 0
    # a float32 math-backend solve of the final weights (those measured at step 4)
    assert cb.probe is not None
    with guard(model, seed=0), sdpa_kernel([SDPBackend.MATH]):
        op = ProbeHessian(model, cb.probe, lambda m, b: m.loss(b))
        assert op.dtype == torch.float32 and op.device.type == "cuda"
        ref = top_eigen(op, k=1, max_iter=80, tol=1e-8)
    assert lam[4] == pytest.approx(ref.lambda_max, rel=5e-3)


def test_fused_sdpa_kernels_have_no_double_backward() -> None:
    """Why the guard switches backends: a double backward through a fused kernel fails (if this
    torch ever gains one, the test skips: the math switch is then merely slower)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, HEADS, CTX, 8, device="cuda", generator=gen, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
            g.sum().backward()
    except RuntimeError as err:
        assert "derivative" in str(err) or "not implemented" in str(err) or "kernel" in str(err), (
            err
        )
        return
    pytest.skip("the memory-efficient SDPA kernel has a double backward in this torch")
