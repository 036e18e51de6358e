"""K-FAC on CUDA: factors, eigenbases' effect and steps equal the CPU run; AMP on CUDA (fp16 with a
GradScaler: the scale is divided out, a skipped inf step leaves everything untouched; bf16
autocast keeps float32 factors)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.optim import KFACPreconditioner

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _conv_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3),
    ).to(dtype)  # fmt: skip


def _data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _run(model: nn.Module, device: str, steps: int, dtype: torch.dtype) -> tuple[list, list]:
    """``steps`` K-FAC + SGD steps (factors and eigendecompositions every step, KL clipping on)."""
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(
        model, optimizer=opt, damping=0.05, factor_update_every=1, inverse_update_every=1
    )
    params, factors = [], []
    for k in range(steps):
        x, y = _data(seed=k)
        opt.zero_grad()
        F.cross_entropy(model(x.to(device, dtype)), y.to(device)).backward()
        pre.step()
        opt.step()
        params.append([p.detach().cpu().clone() for p in model.parameters()])
        factors.append(
            {n: tuple(f.detach().cpu().clone() for f in fs) for n, fs in pre.factors().items()}
        )
    assert pre.steps == steps
    return params, factors


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_factors_and_steps_on_cuda_equal_cpu(dtype: torch.dtype, tol: float) -> None:
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu_params, cpu_factors = _run(_conv_net(dtype), "cpu", 4, dtype)
        gpu_params, gpu_factors = _run(_conv_net(dtype), "cuda", 4, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert sorted(gpu_factors[0]) == ["0", "2", "5", "7"]
    for step in range(4):
        for name, (a, g) in cpu_factors[step].items():
            got_a, got_g = gpu_factors[step][name]
            assert got_a.dtype == a.dtype == dtype
            torch.testing.assert_close(got_a, a, rtol=tol, atol=tol)
            torch.testing.assert_close(got_g, g, rtol=tol, atol=tol)
        for p, q in zip(gpu_params[step], cpu_params[step]):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=f"step {step}")


def _amp_step(model, pre, opt, scaler, x, y, poison: bool = False) -> None:  # noqa: ANN001
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    pre.step()
    scaler.step(opt)
    scaler.update()


def test_fp16_scaled_factors_and_skipped_inf_step_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).cuda()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(16, 3, generator=gen).cuda(),
        torch.randint(0, 3, (16,), generator=gen).cuda(),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    pre = KFACPreconditioner(
        model, optimizer=opt, grad_scaler=scaler, factor_update_every=1, inverse_update_every=1
    )
    _amp_step(model, pre, opt, scaler, x, y)
    p_ref = KFACPreconditioner(
        reference, factor_update_every=1, inverse_update_every=1, kl_clip=None
    )
    F.cross_entropy(reference(x), y).backward()
    p_ref.step()
    for name in ("0", "2"):  # the loss scale 2^12 (G: 2^24) is divided out; fp16 accuracy
        for got, want in zip(pre.factors()[name], p_ref.factors()[name]):
            assert got.dtype == torch.float32 and got.device.type == "cuda"
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
    before = (
        {n: tuple(f.clone() for f in fs) for n, fs in pre.factors().items()},
        [p.detach().clone() for p in model.parameters()],
        pre.steps,
    )
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


def test_bf16_autocast_keeps_float32_factors_on_cuda() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    model = _conv_net(torch.float32).cuda()
    reference = copy.deepcopy(model)
    kw = dict(factor_update_every=1, inverse_update_every=1, kl_clip=None)
    pre, p_ref = KFACPreconditioner(model, **kw), KFACPreconditioner(reference, **kw)  # type: ignore[arg-type]
    x, y = (t.cuda() for t in _data(8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.float()), y)
    loss.backward()
    F.cross_entropy(reference(x.float()), y).backward()
    pre.step()
    p_ref.step()
    for name, (a_ref, g_ref) in p_ref.factors().items():
        for got, want in zip(pre.factors()[name], (a_ref, g_ref)):
            assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
            torch.testing.assert_close(got, want, rtol=0.1, atol=2e-2)
