"""λ_max (and the top of the spectrum) on CUDA against a float64 dense Hessian computed on the CPU."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_landscape.measures.eigen import top_eigen
from lightning_landscape.measures.operators import ProbeHessian
from lightning_landscape.measures.probe import Probe

from ..measures.helpers import ce_loss, dense_hessian, tiny_data, tiny_mlp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """Full fp32 matmuls and convolutions (TF32 would cost ~1e-3 relative accuracy)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _dense_vectorized(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of the mean cross-entropy (vmapped over the rows)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[off : off + s.numel()].view(s)
            off += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def _cuda_probe(x: torch.Tensor, y: torch.Tensor, batch_size: int, dtype: torch.dtype) -> Probe:
    return Probe.from_samples((x.to("cuda", dtype), y.to("cuda")), batch_size=batch_size)


@pytest.mark.parametrize(
    ("method", "reuse"),
    [
        ("reverse_over_reverse", True),
        ("reverse_over_reverse", False),
        ("forward_over_reverse", False),
    ],
)
def test_float64_top_eigenpairs_on_cuda_match_the_dense_hessian(method: str, reuse: bool) -> None:
    model, (x, y) = tiny_mlp(), tiny_data(13)
    dense = torch.linalg.eigvalsh(dense_hessian(model, x, y))  # ascending, float64, CPU
    gpu = copy.deepcopy(model).cuda()
    op = ProbeHessian(
        gpu, _cuda_probe(x, y, 5, torch.float64), ce_loss, method=method, reuse_graph=reuse
    )  # type: ignore[arg-type]
    est = top_eigen(op, k=3, max_iter=op.size, tol=1e-10, bottom=True)
    assert est.eigenvectors.device.type == "cuda"
    scale = float(dense.abs().max())
    torch.testing.assert_close(est.eigenvalues.cpu(), dense.flip(0)[:3], rtol=0, atol=1e-9 * scale)
    assert abs(est.lambda_min - float(dense[0])) <= 1e-9 * scale


def test_float32_lambda_max_on_cuda_matches_float64_dense() -> None:
    """A 10 → 16 → 16 → 4 tanh MLP (516 parameters): fp32 HVPs on CUDA give λ_max to ~1e-5."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 10, generator=gen), torch.randint(0, 4, (200,), generator=gen)
    ref = float(
        torch.linalg.eigvalsh(_dense_vectorized(copy.deepcopy(model).double(), x.double(), y))[-1]
    )
    op = ProbeHessian(model.cuda(), _cuda_probe(x, y, 64, torch.float32), ce_loss)
    est = top_eigen(op, k=1, max_iter=100, tol=1e-6)
    assert est.converged
    assert abs(est.lambda_max - ref) <= 1e-4 * abs(ref)


def test_conv_batchnorm_eval_float64_on_cuda_matches_dense() -> None:
    """cuDNN convolution and BatchNorm (running statistics) in the double backward."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    dense = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    op = ProbeHessian(copy.deepcopy(model).cuda(), _cuda_probe(x, y, 10, torch.float64), ce_loss)
    est = top_eigen(op, k=2, max_iter=op.size, tol=1e-10)
    scale = float(dense.abs().max())
    torch.testing.assert_close(est.eigenvalues.cpu(), dense.flip(0)[:2], rtol=0, atol=1e-9 * scale)


def test_cuda_products_equal_cpu_products_in_float64() -> None:
    model, (x, y) = tiny_mlp(seed=3), tiny_data(17, seed=4)
    cpu = ProbeHessian(model, Probe.from_samples((x, y), batch_size=6), ce_loss)
    gpu = ProbeHessian(copy.deepcopy(model).cuda(), _cuda_probe(x, y, 6, torch.float64), ce_loss)
    v = torch.randn(cpu.size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for _ in range(2):  # the second product reuses the cached graphs
        torch.testing.assert_close(
            gpu.matvec(v.cuda()).cpu(), cpu.matvec(v), rtol=1e-12, atol=1e-13
        )
    loss_cpu, grad_cpu = cpu.loss_and_gradient()
    loss_gpu, grad_gpu = gpu.loss_and_gradient()
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-13)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-12, atol=1e-13)
