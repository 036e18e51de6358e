"""K-FAC preconditioner behaviour: what is (not) recorded, AMP, skipped layers, resume, arguments.

Forwards in eval mode, under ``no_grad``/``inference_mode`` or inside ``paused()`` never reach
the factors; fp16 autocast with a ``GradScaler`` gives the fp32 factors (the scale is divided
out) and a step the scaler skips leaves everything untouched; ``MultiheadAttention.out_proj``
(called functionally) is skipped with one warning while training proceeds; a resumed run equals
the uninterrupted one bit for bit; bad arguments raise ``ValueError`` naming them.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim.kfac import KFACPreconditioner
from lightning_landscape.optim.kfac.distributed import owners

from .kfac_reference import DT
from .test_kfac import _backward, _data, _mlp, _pre


# ------------------------------------------------------------------ what is (not) recorded
def test_eval_no_grad_and_paused_forwards_are_not_recorded() -> None:
    x, y = _data()
    clean, noisy = _mlp(), _mlp()
    p_clean, p_noisy = _pre(clean), _pre(noisy)
    xo, yo = _data(7, seed=9)
    noisy.eval()
    _backward(noisy, xo, yo)  # eval mode
    noisy.train()
    with torch.no_grad():
        noisy(xo)
    with p_noisy.paused(), p_noisy.paused():  # re-entrant
        _backward(noisy, xo, yo)
    with torch.inference_mode():
        noisy(xo)
    noisy.zero_grad()
    for m in (clean, noisy):
        _backward(m, x, y)
    p_clean.step()
    p_noisy.step()
    for name in ("0", "2"):
        for got, want in zip(p_noisy.factors()[name], p_clean.factors()[name]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and the test can fail: a recorded extra forward changes the factors
    extra = _mlp()
    p_extra = _pre(extra)
    _backward(extra, xo, yo)
    extra.zero_grad()
    _backward(extra, x, y)
    p_extra.step()
    assert not torch.allclose(p_extra.factors()["0"][0], p_clean.factors()["0"][0])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


def test_multihead_attention_out_proj_is_skipped_with_one_warning() -> None:
    torch.manual_seed(0)
    model = _Attention().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt, factor_update_every=2, inverse_update_every=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=gen)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pre.step()
            opt.step()
            losses.append(float(loss))
    messages = [str(w.message) for w in caught if "K-FAC" in str(w.message)]
    assert len(messages) == 1 and "'attn.out_proj'" in messages[0], messages
    assert sorted(pre.layers) == ["embed", "head"] and "attn.out_proj" in pre.skipped
    assert pre.info.preconditioned and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_layer_selection_and_unsupported_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2, 2),
        nn.Linear(2, 2),
    )  # fmt: skip
    model[1].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="groups=2.*frozen|frozen.*groups=2"):
        pre = _pre(model, skip=r"^4$")
    assert sorted(pre.layers) == ["3"] and sorted(pre.skipped) == ["0", "1"]
    only = _pre(model, layers=r"^[34]$")
    assert sorted(only.layers) == ["3", "4"]


def test_resume_equals_uninterrupted() -> None:
    batches = [_data(6, seed=s) for s in range(8)]
    kw = dict(factor_update_every=2, inverse_update_every=3, kl_clip=1e-3, damping=0.05)

    def run(model: nn.Module, pre: KFACPreconditioner, opt: torch.optim.Optimizer, bs: Any) -> None:
        for x, y in bs:
            opt.zero_grad()
            _backward(model, x, y)
            pre.step()
            opt.step()

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    whole = _pre(model, optimizer=opt, **kw)
    run(model, whole, opt, batches)

    first = _mlp()
    opt1 = torch.optim.SGD(first.parameters(), lr=0.3, momentum=0.9)
    pre1 = _pre(first, optimizer=opt1, **kw)
    run(first, pre1, opt1, batches[:5])
    saved = (copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict()), pre1.state_dict())
    second = _mlp(seed=5)
    second.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(second.parameters(), lr=0.3, momentum=0.9)
    opt2.load_state_dict(saved[1])
    pre2 = _pre(second, optimizer=opt2, **kw)
    pre2.load_state_dict(saved[2])
    run(second, pre2, opt2, batches[5:])
    for a, b in zip(second.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for name in ("0", "2"):
        for got, want in zip(pre2.factors()[name], whole.factors()[name]):
            assert torch.equal(got, want)
    assert pre2.steps == whole.steps == 8


# ------------------------------------------------------------------ arguments and helpers
BAD: list[tuple[dict[str, Any], str]] = [
    ({"damping": 0.0}, "`damping`"),
    ({"damping": "big"}, "`damping`"),
    ({"factor_decay": 1.0}, "`factor_decay`"),
    ({"factor_decay": -0.1}, "`factor_decay`"),
    ({"factor_update_every": 0}, "`factor_update_every`"),
    ({"inverse_update_every": 2.5}, "`inverse_update_every`"),
    ({"kl_clip": -1.0}, "`kl_clip`"),
    ({"kl_clip": 1e-3}, "`kl_clip`=0.001 needs the learning rate"),
    ({"kl_clip": None, "lr": 0.0}, "`lr`"),
    ({"kl_clip": None, "loss_reduction": "avg"}, "`loss_reduction`"),
    ({"kl_clip": None, "damping_mode": "tikhonov"}, "`damping_mode`"),
    ({"kl_clip": None, "layers": "("}, "`layers`"),
    ({"kl_clip": None, "skip": 3}, "`skip`"),
    ({"kl_clip": None, "optimizer": "sgd"}, "`optimizer`"),
    ({"kl_clip": None, "grad_scaler": 2.0}, "`grad_scaler`"),
    ({"kl_clip": None, "distribute_inverses": 1}, "`distribute_inverses`"),
    ({"kl_clip": None, "factor_dtype": torch.float16}, "`factor_dtype`"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[b[1] for b in BAD])
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        KFACPreconditioner(_mlp(), **kwargs)


def test_kl_clip_none_and_owner_assignment() -> None:
    pre = KFACPreconditioner(_mlp(), kl_clip=None)  # no optimizer needed without clipping
    assert pre.kl_clip is None
    assert owners([1.0, 5.0, 2.0, 2.0], world=3) == [1, 0, 1, 2]  # ties: lower rank
    assert owners([3.0, 3.0], world=1) == [0, 0]


# ------------------------------------------------------------------ mixed precision
def _amp_step(
    model: nn.Module,
    pre: KFACPreconditioner,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    poison: bool = False,
) -> None:
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    pre.step()
    scaler.step(opt)
    scaler.update()


def test_fp16_scaled_factors_and_skipped_inf_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    x, y = (t.float() if t.is_floating_point() else t for t in _data(16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pre = KFACPreconditioner(
        model, optimizer=opt, grad_scaler=scaler, factor_update_every=1, inverse_update_every=1
    )
    _amp_step(model, pre, opt, scaler, x, y)
    p_ref = _pre(reference)
    F.cross_entropy(reference(x), y).backward()
    p_ref.step()
    for name in ("0", "2"):  # the loss scale 2^12 (G: 2^24) is divided out, fp16 accuracy
        for got, want in zip(pre.factors()[name], p_ref.factors()[name]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
    before = (pre.factors(), [p.detach().clone() for p in model.parameters()], pre.steps)
    _amp_step(model, pre, opt, scaler, x, y, poison=True)  # the scaler skips this step
    assert pre.info.skipped and pre.steps == before[2] == 1 and pre.skipped_steps == 1
    assert scaler.get_scale() == 2.0**11
    for name in ("0", "2"):
        for got, want in zip(pre.factors()[name], before[0][name]):
            assert torch.equal(got, want)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    _amp_step(model, pre, opt, scaler, x, y)  # and training goes on
    assert pre.info.factors_updated and pre.steps == 2
    assert not torch.equal(pre.factors()["0"][1], before[0]["0"][1])


def test_bf16_autocast_keeps_float32_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3))
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    pre, p_ref = _pre(model), _pre(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    F.cross_entropy(reference(x), y).backward()
    pre.step()
    p_ref.step()
    for name in ("0", "3"):
        for got, want in zip(pre.factors()[name], p_ref.factors()[name]):
            assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
            torch.testing.assert_close(got, want, rtol=0.1, atol=2e-2)
