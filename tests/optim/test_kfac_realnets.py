"""K-FAC on real nets: bias-free layers, reused modules, tied weights, a ResNet and a GPT.

- Bias-free Linear/Conv2d: factors, step and ``P^{-1/2}`` (squared: the damped inverse) against
  dense float64 ``kron(G, A) + λI``, in both damping modes and through the stability rule.
- A Linear called three times per forward (under two names) is KFAC-expand over its calls,
  against per-example loops, for mean and sum losses with accumulation.
- Layers holding a parameter another module holds (LM head tied to the embedding, two Linear
  sharing a weight, a bias shared with an unregistered Linear) are skipped with one warning;
  their gradients are untouched and the stability rule has ``P = ν·I`` on them.
- Lightning: a ResNet (bias-free convs, BatchNorm, in-place ReLU, residual adds) with
  accumulation, clipping and ``Sharpness`` is finite without observer effect; a GPT-style LM
  with a tied head warns once and its tied parameter takes the plain SGD step.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks.kfac import KFAC
from lightning_landscape.callbacks.sharpness import Sharpness
from lightning_landscape.measures.operators import flatten, unflatten
from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.kfac.profile import attach
from lightning_landscape.optim.stability import stability_of
from tests.callbacks.helpers import RecordingLogger

from .kfac_reference import (
    DT,
    conv_factors,
    dense_p,
    exact_solve,
    grad_matrix,
    linear_factors,
    pi_solve,
    sym_inverse_sqrt,
    with_ones,
)

TIGHT: dict[str, Any] = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ bias-free layers
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_bias_free_inverse_sqrt_squares_to_the_damped_inverse(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3, bias=False)
    ).double()
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(6, 2, 3, 3, generator=gen, dtype=DT),
        torch.randint(0, 3, (6,), generator=gen),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    damping = 0.05
    pre = KFACPreconditioner(
        model, optimizer=opt, damping=damping, damping_mode=mode, kl_clip=None,
        factor_update_every=1, inverse_update_every=1,
    )  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    grads = [grad_matrix(model[i]).clone() for i in (0, 3)]
    pre.step()
    reference = copy.deepcopy(model)
    factors = [
        conv_factors(reference, reference[0], x, y),  # type: ignore[arg-type]
        linear_factors(reference, reference[3], x, y),  # type: ignore[arg-type]
    ]
    solve = exact_solve if mode == "exact" else pi_solve
    for i, name, (a, g), m in zip((0, 3), ("0", "3"), factors, grads):
        assert len(pre.layers[name].params) == 1  # no bias column
        for got, want in zip(pre.factors()[name], (a, g)):
            torch.testing.assert_close(got, want, **TIGHT)
        torch.testing.assert_close(grad_matrix(model[i]), solve(a, g, m, damping), **TIGHT)
    # P^{-1/2} column by column (flat order of the parameters: row-major W of each layer)
    params: list[torch.Tensor] = list(model.parameters())
    p_dense = torch.block_diag(*(dense_p(a, g, damping, mode) for a, g in factors))
    eye = torch.eye(p_dense.shape[0], dtype=DT)
    s = torch.stack([flatten(pre.inverse_sqrt(params, unflatten(e, params))) for e in eye]).T
    torch.testing.assert_close(s @ s, torch.linalg.inv(p_dense), **TIGHT)
    torch.testing.assert_close(s, sym_inverse_sqrt(p_dense), **TIGHT)
    stab = stability_of(opt, params)
    assert stab is not None and stab.inverse_sqrt is not None
    v = torch.randn(p_dense.shape[0], generator=gen, dtype=DT)
    torch.testing.assert_close(flatten(stab.inverse_sqrt(unflatten(v, params))), s @ v, **TIGHT)
    assert pre.inverse_sqrt(params[1:], [params[1]])[0].shape == params[1].shape  # a subset


# ------------------------------------------------------------------ a module called 3 times
class _Reused(nn.Module):
    """One Linear registered as ``enc`` and ``dec`` and applied to two inputs, then chained."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 3)
        self.dec = self.enc  # the same module under a second name
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x[:, :3])) + torch.tanh(self.dec(x[:, 3:]))
        return self.head(torch.tanh(self.enc(h)))  # a third call, on a call's output


def _reused_factors(model: _Reused, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KFAC-expand over the calls of ``enc``, from one backward per example."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        inputs.append(i[0].detach())
        outputs.append(o)

    handle = model.enc.register_forward_hook(hook)
    gs = []
    for n in range(x.shape[0]):
        outputs.clear()
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        gs += [g[0] for g in torch.autograd.grad(loss, outputs)]
    inputs.clear()
    with torch.no_grad():
        model(x)
    handle.remove()
    a = with_ones(torch.cat(inputs))  # (T·N, in + 1)
    g = torch.stack(gs)  # (N·T, out)
    return a.T @ a / a.shape[0], g.T @ g / x.shape[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_linear_called_three_times_is_kfac_expand_over_its_calls(reduction: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
    model = _Reused().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one module at two names is not a tied parameter
        pre = KFACPreconditioner(
            model, damping=0.1, kl_clip=None, factor_update_every=1, inverse_update_every=1,
            loss_reduction=reduction,
        )  # fmt: skip
    assert sorted(pre.layers) == ["enc", "head"]
    for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):  # two accumulated micro-batches
        scale = 0.5 if reduction == "mean" else 1.0
        (F.cross_entropy(model(xs), ys, reduction=reduction) * scale).backward()
    m = grad_matrix(model.enc).clone()
    pre.step()
    a, g = _reused_factors(copy.deepcopy(model), x, y)
    for got, want in zip(pre.factors()["enc"], (a, g)):
        torch.testing.assert_close(got, want, **TIGHT)
    torch.testing.assert_close(grad_matrix(model.enc), exact_solve(a, g, m, 0.1), **TIGHT)


# ------------------------------------------------------------------ tied parameters
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)  # the only layer K-FAC may precondition
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight  # two Linear sharing one weight
        self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4)
        self.d.bias = self.c.bias  # a bias shared with a Linear K-FAC does not register
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.tok.weight  # an LM head tied to the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.tok(x)))
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        return self.head(torch.tanh(self.d(torch.tanh(self.c(h)))))


@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_tied_parameters_are_left_to_the_optimizer_with_one_warning(kl_clip: float | None) -> None:
    model = _Tied().double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 7, (6, 5), generator=gen), torch.randint(0, 7, (6, 5), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = KFACPreconditioner(
            model, optimizer=opt, skip="^d$", kl_clip=kl_clip, factor_update_every=1,
            inverse_update_every=1,
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for quoted in ("'head.weight' is also 'tok.weight'", "'a.weight' is also 'b.weight'",
                   "'b.weight' is also 'a.weight'", "'c.bias' is also 'd.bias'"):  # fmt: skip
        assert quoted in messages[0], messages[0]
    assert sorted(pre.layers) == ["mix"]
    assert {"a", "b", "c", "head"} <= set(pre.skipped) and "d" not in pre.skipped
    F.cross_entropy(model(x).reshape(-1, 7), y.reshape(-1)).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    pre.step()
    for name, p in model.named_parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, raw[name]) == (not name.startswith("mix.")), name
    nu, params = pre.kl_scale, list(model.parameters())
    assert (nu < 0.5) == (kl_clip is not None)
    stab = stability_of(opt, params)
    assert stab is not None and stab.inverse_sqrt is not None
    inv_sqrt = stab.inverse_sqrt
    vs = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
    for (name, _), v, out in zip(model.named_parameters(), vs, inv_sqrt(vs)):
        if not name.startswith("mix."):  # P = ν·I: the raw gradient was not scaled by ν
            torch.testing.assert_close(out, v / math.sqrt(nu), rtol=1e-15, atol=0)
    # what K-FAC did to the gradient is ν·P⁻¹ of the stability rule, tied parameters included
    done = inv_sqrt(inv_sqrt([raw[n] for n, _ in model.named_parameters()]))
    for (name, p), want in zip(model.named_parameters(), done):
        torch.testing.assert_close(p.grad, nu * want, **TIGHT, msg=name)


# ------------------------------------------------------------------ Lightning: a ResNet
class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = (
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.relu(out)


class _ResNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(_Block(4, 4, 1), _Block(4, 8, 2))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(model: pl.LightningModule, loader: DataLoader, callbacks: list[Any], **kw: Any) -> None:
    pl.Trainer(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kw,
    ).fit(model, loader)  # fmt: skip


def test_resnet_with_kfac_and_sharpness_is_finite_without_observer_effect() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 6, 6, generator=gen)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 5, (32,), generator=gen)), batch_size=4)
    kw: dict[str, Any] = dict(max_steps=4, accumulate_grad_batches=2, gradient_clip_val=1.0)
    hyper: dict[str, Any] = dict(damping=1e-2, factor_update_every=1, inverse_update_every=2)
    runs = []
    for measured in (True, False):
        logger, kfac, model = RecordingLogger(), KFAC(**hyper), _ResNet()
        sharp = [
            Sharpness(every_n_steps=2, probe_size=8, probe_batch_size=4, max_iter=6, settle_steps=0)
        ]
        _fit(model, loader, [kfac, *sharp[:measured]], logger=logger, **kw)
        pre = kfac.preconditioner
        assert pre is not None and pre.steps == 4 and not pre.skipped
        assert len(pre.layers) == 7  # 6 bias-free convs (one a 1×1 shortcut) and the head
        runs.append((model.state_dict(), logger))
    (measured_state, logger), (plain_state, _) = runs
    for name, t in measured_state.items():  # BatchNorm buffers included
        assert torch.equal(t, plain_state[name]), name
    assert all(bool(torch.isfinite(t).all()) for t in measured_state.values())
    for tag in ("lambda_max", "preconditioned", "threshold", "ratio"):
        series = logger.series(f"landscape/sharpness/{tag}")
        assert series and all(math.isfinite(v) for v in series.values()), (tag, series)
    assert set(logger.series("landscape/sharpness/preconditioned")) == {2, 4}
    assert all(math.isfinite(v) for v in logger.series("landscape/kfac/kl_scale").values())


# ------------------------------------------------------------------ Lightning: a GPT
class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = (
            t.view(n, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)
        )
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(h.transpose(1, 2).reshape(n, length, d))


class _GPTBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, 2)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _GPT(pl.LightningModule):
    def __init__(self, vocab: int = 11, d: int = 8, length: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, length, d))
        self.blocks = nn.Sequential(_GPTBlock(d), _GPTBlock(d))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.lm_head(self.ln_f(self.blocks(h)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (idx,) = batch
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Updates(pl.Callback):
    """Listed before ``KFAC``: records the raw gradients and which parameters took ``−η·raw``."""

    def __init__(self) -> None:
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plain: list[set[str]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.before = {
            n: (p.detach().clone(), p.grad.detach().clone())  # type: ignore[union-attr]
            for n, p in pl_module.named_parameters()
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.plain.append({
            n for n, p in pl_module.named_parameters()
            if torch.equal(p.detach(), self.before[n][0].add(self.before[n][1], alpha=-lr))
        })  # fmt: skip


def test_gpt_with_a_tied_head_leaves_the_tied_parameter_to_sgd() -> None:
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randint(0, 11, (24, 7), generator=gen)), batch_size=6)
    logger, updates, model = RecordingLogger(), _Updates(), _GPT()
    kfac = KFAC(damping=1e-2, factor_update_every=1, inverse_update_every=1, kl_clip=1e-2)
    sharp = Sharpness(every_n_steps=2, probe_size=6, probe_batch_size=6, max_iter=6, settle_steps=0)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(SDPBackend.MATH):
        warnings.simplefilter("always")
        _fit(model, loader, [updates, kfac, sharp], logger=logger, max_steps=4)
    tied = [str(w.message) for w in caught if "tok.weight" in str(w.message)]
    assert len(tied) == 1 and "'lm_head'" in tied[0] and "'lm_head.weight'" in tied[0], tied
    pre = kfac.preconditioner
    assert pre is not None and pre.steps == 4 and "lm_head" in pre.skipped
    assert len(pre.layers) == 8  # qkv, proj, fc, out of both blocks
    for plain in updates.plain:  # the tied parameter takes SGD's step on its raw gradient
        assert "tok.weight" in plain and "blocks.0.fc.weight" not in plain, plain
    params, opt = list(model.parameters()), pre.optimizer
    assert opt is not None
    attach(pre, opt)  # (teardown detached the rule)
    stab = stability_of(opt, params)
    assert stab is not None and stab.inverse_sqrt is not None
    vs = [torch.randn(p.shape, generator=gen) for p in params]
    out = stab.inverse_sqrt(vs)
    i = next(i for i, p in enumerate(params) if p is model.tok.weight)
    nu = pre.kl_scale  # P = ν·I on parameters K-FAC leaves alone (their step is not ν-scaled)
    torch.testing.assert_close(out[i], vs[i] / math.sqrt(nu), rtol=1e-6, atol=0)
    got = logger.series("landscape/sharpness/preconditioned")
    assert set(got) == {2, 4} and all(math.isfinite(v) for v in got.values()), got
