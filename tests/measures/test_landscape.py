"""Loss landscapes: closed forms in float64, filter normalisation, exact restoration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_landscape.measures.landscape import (
    evaluate_points,
    filter_normalize,
    filter_normalized_directions,
    grid_coordinates,
    linear_interpolation,
    loss_surface,
)
from lightning_landscape.measures.operators import NonFiniteError, ProbeHessian, flatten, unflatten
from lightning_landscape.measures.probe import Probe

from ..ddp_workers import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: threads only fight over the 2 cores
        yield


def _half_squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


def _regression(n: int = 10, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return model, (x, y)


def _taylor(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]):
    """Loss, gradient and dense Hessian at θ of the mean loss on all samples (exact for a
    quadratic loss: L(θ + v) = L + g·v + ½ vᵀHv)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, off = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            params[n] = flat[off : off + k].view(s)
            off += k
        out = torch.func.functional_call(model, params, (data[0],))
        return 0.5 * ((out - data[1]) ** 2).sum(dim=1).mean()

    loss = f(flat0).detach()
    grad = torch.autograd.functional.jacobian(f, flat0)
    hess = torch.autograd.functional.hessian(f, flat0)
    return float(loss), grad, hess


@pytest.mark.parametrize("dims", [1, 2])
def test_surface_of_a_quadratic_equals_the_closed_form(dims: int) -> None:
    model, data = _regression()
    probe = Probe.from_samples(data, batch_size=4)  # batches of 4, 3, 3: weights matter
    assert probe.sizes == [4, 3, 3]
    op = ProbeHessian(model, probe, _half_squared_error)
    dirs = filter_normalized_directions(op.parameters, count=dims, seed=7, keep_1d=True)
    surface = loss_surface(op, dirs, resolution=5, span=1.5, chunk_size=4)
    loss, g, h = _taylor(model, data)
    c = grid_coordinates(5, 1.5)
    assert surface.center == pytest.approx(loss, rel=1e-14)
    if dims == 1:
        (d,) = dirs
        expected = loss + c * (g @ d) + 0.5 * c**2 * (d @ h @ d)
        assert surface.betas is None and surface.dims == 1
    else:
        d1, d2 = dirs
        a, b = c[None, :], c[:, None]  # columns follow alpha, rows follow beta
        expected = (
            loss
            + a * (g @ d1)
            + b * (g @ d2)
            + 0.5 * (a**2 * (d1 @ h @ d1) + 2 * a * b * (d1 @ h @ d2) + b**2 * (d2 @ h @ d2))
        )
        assert surface.dims == 2 and torch.equal(surface.betas, c)
    assert torch.equal(surface.alphas, c)
    assert surface.losses.dtype == torch.float64
    torch.testing.assert_close(surface.losses, expected, rtol=1e-12, atol=1e-13)
    # the test can fail: averaging the three batch losses uniformly is measurably different
    with torch.no_grad():
        naive = torch.stack([_half_squared_error(model, b) for b in probe]).mean()
    assert abs(float(naive) - surface.center) > 1e-3


def test_grid_coordinates_are_antisymmetric_with_an_exact_zero() -> None:
    c = grid_coordinates(21, 0.7)
    assert torch.equal(c, -c.flip(0)) and c[10].item() == 0.0
    assert c[0].item() == pytest.approx(-0.7, abs=1e-15) and len(c) == 21
    assert torch.allclose(c.diff(), torch.full((20,), 0.07, dtype=torch.float64), atol=1e-15)


def _scaled_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    lin, conv, bn = nn.Linear(5, 4).double(), nn.Conv2d(3, 6, 3).double(), nn.BatchNorm2d(6)
    with torch.no_grad():  # filters of very different norms, one of them zero
        lin.weight.mul_(torch.tensor([0.1, 1.0, 10.0, 0.0], dtype=torch.float64)[:, None])
        conv.weight.mul_(torch.arange(1, 7, dtype=torch.float64)[:, None, None, None])
        bn.weight.data = torch.rand(6, dtype=torch.float64) + 0.5
        bn.bias.data = torch.rand(6, dtype=torch.float64)
    return [lin.weight, lin.bias, conv.weight, conv.bias, bn.weight, bn.bias]


def test_filter_normalisation_per_output_row_and_channel() -> None:
    params = _scaled_params()
    d1, d2 = filter_normalized_directions(params, count=2, seed=3)
    # reference: the same Gaussian draws (one generator, every parameter in order) by hand
    gen = torch.Generator().manual_seed(3)
    raw = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for got, p, r in zip(unflatten(d1, params), params, raw):
        if p.dim() == 1:
            assert torch.equal(got, torch.zeros_like(p))  # biases and BN zeroed
            continue
        for i in range(p.shape[0]):  # filter i = output row (Linear) / output channel (conv)
            expected = r[i] * (p[i].norm() / r[i].norm()) if p[i].norm() > 0 else 0 * r[i]
            torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-14)
            assert float(got[i].norm()) == pytest.approx(float(p[i].detach().norm()), rel=1e-12)
    lin = unflatten(d1, params)[0]
    assert torch.equal(lin[3], torch.zeros(5, dtype=torch.float64))  # zero filter: zero, no NaN
    col = lin.norm(dim=0) / params[0].detach().norm(dim=0)
    assert (col - 1).abs().max() > 0.1  # columns are not what is normalised
    assert not torch.allclose(d1, d2)  # two different directions
    again = filter_normalized_directions(params, count=2, seed=3)
    assert torch.equal(again[0], d1) and torch.equal(again[1], d2)
    assert not torch.allclose(filter_normalized_directions(params, seed=4)[0], d1)


def test_keep_1d_keeps_biases_and_leaves_the_weights_alone() -> None:
    params = _scaled_params()
    zeroed = unflatten(filter_normalized_directions(params, count=2, seed=3)[1], params)
    kept = unflatten(filter_normalized_directions(params, count=2, seed=3, keep_1d=True)[1], params)
    for z, k, p in zip(zeroed, kept, params):
        if p.dim() > 1:
            assert torch.equal(z, k)
        else:
            assert float(k.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
            assert float(k.abs().min()) > 0 and float(z.abs().max()) == 0.0


def test_parameters_are_bit_identical_afterwards() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # float32
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    op = ProbeHessian(
        model,
        Probe.from_samples((x, y), batch_size=7),
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
    )
    before = [p.detach().clone() for p in model.parameters()]
    storage = [p.data_ptr() for p in model.parameters()]
    start = flatten([torch.randn_like(p) for p in model.parameters()])
    dirs = filter_normalized_directions(op.parameters, count=2, seed=1, keep_1d=True)
    loss_surface(op, dirs, resolution=4, span=0.9, chunk_size=5)
    linear_interpolation(op, start, resolution=4)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert storage == [p.data_ptr() for p in model.parameters()]
    # and after a failure: a NaN sample makes the loss at θ non-finite
    bad_x = x.clone()
    bad_x[3, 0] = float("nan")
    bad = ProbeHessian(model, Probe.from_samples((bad_x, y), batch_size=7), op.loss_fn)
    with pytest.raises(NonFiniteError):
        loss_surface(bad, dirs, resolution=3)
    with pytest.raises(NonFiniteError):
        linear_interpolation(bad, start, resolution=3)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _DoubleWell(nn.Module):
    """Per-sample loss (w² − c)²: L(w) = mean_i (w² − c_i)², a barrier at w = 0."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))


def _double_well_loss(model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
    return ((model.w**2 - batch[0]) ** 2).mean()


def test_barrier_of_a_double_well_equals_the_closed_form() -> None:
    c = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.7], dtype=torch.float64)
    a = 1.2
    model = _DoubleWell(a)  # θ = a, θ0 = −a: the line crosses w = 0 at t = 1/2
    op = ProbeHessian(model, Probe.from_samples((c,), batch_size=2), _double_well_loss)
    start = torch.tensor([-a], dtype=torch.float64)
    interp = linear_interpolation(op, start, resolution=21, chunk_size=6)
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    w = -a + 2 * a * t
    expected = ((w[:, None] ** 2 - c[None, :]) ** 2).mean(dim=1)
    torch.testing.assert_close(interp.losses, expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(interp.t, t)
    exact = float((c**2).mean() - ((a**2 - c) ** 2).mean())
    assert interp.barrier == pytest.approx(exact, rel=1e-13)
    assert model.w.item() == a


def test_barrier_of_a_convex_loss_is_zero_and_the_line_ends_are_exact() -> None:
    model, data = _regression(seed=3)
    op = ProbeHessian(model, Probe.from_samples(data, batch_size=3), _half_squared_error)
    theta = op.vector()
    start = theta + torch.linspace(-1, 1, op.size, dtype=torch.float64)
    interp = linear_interpolation(op, start, resolution=7)
    assert interp.barrier == 0.0 and interp.losses[0] > interp.losses[-1]
    op.set_vector(start)
    at_start = op.loss()
    op.set_vector(theta)
    assert float(interp.losses[0]) == pytest.approx(at_start, rel=1e-14)
    assert float(interp.losses[-1]) == pytest.approx(op.loss(), rel=1e-14)


def test_chunks_do_not_change_the_result_and_report_progress() -> None:
    model, data = _regression()
    op = ProbeHessian(model, Probe.from_samples(data, batch_size=4), _half_squared_error)
    dirs = filter_normalized_directions(op.parameters, count=2, seed=0)
    calls: list[tuple[int, int]] = []
    chunked = loss_surface(
        op, dirs, resolution=4, chunk_size=5, progress=lambda d, n: calls.append((d, n))
    )
    assert calls == [(5, 17), (10, 17), (15, 17), (17, 17)]  # 4×4 grid + the point θ
    for size in (1, 1000):
        assert torch.equal(
            loss_surface(op, dirs, resolution=4, chunk_size=size).losses, chunked.losses
        )


def test_non_finite_losses_away_from_theta_are_kept() -> None:
    model = _DoubleWell(0.5)
    op = ProbeHessian(
        model,
        Probe.from_samples((torch.ones(3, dtype=torch.float64),), batch_size=2),
        lambda m, b: torch.exp(400 * m.w**2 * b[0]).mean(),
    )
    direction = torch.ones(1, dtype=torch.float64)
    surface = loss_surface(op, [direction], resolution=3, span=2.0)
    assert math.isfinite(surface.center) and math.isinf(float(surface.losses[0]))
    assert float(surface.losses[1]) == surface.center


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda op, d: loss_surface(op, d, resolution=1), "resolution"),
        (lambda op, d: loss_surface(op, d, span=0.0), "span"),
        (lambda op, d: loss_surface(op, d, span=float("inf")), "span"),
        (lambda op, d: loss_surface(op, d, chunk_size=0), "chunk_size"),
        (lambda op, d: loss_surface(op, d * 3), "directions"),
        (lambda op, d: loss_surface(op, [d[0][:-1]]), "directions"),
        (lambda op, d: linear_interpolation(op, d[0][:-1]), "start"),
        (lambda op, d: linear_interpolation(op, d[0], resolution=0), "resolution"),
        (lambda op, d: filter_normalized_directions(op.parameters, count=0), "count"),
        (lambda op, d: filter_normalized_directions(op.parameters, seed=1.5), "seed"),
        (lambda op, d: filter_normalized_directions([]), "params"),
        (lambda op, d: filter_normalize(op.parameters[:1], op.parameters), "direction"),
        (lambda op, d: filter_normalize([op.parameters[1]], op.parameters[:1]), "direction"),
        (lambda op, d: evaluate_points(op, lambda i: d[0], 0), "count"),
    ],
)
def test_bad_arguments_name_the_argument(call, arg) -> None:
    model, data = _regression()
    op = ProbeHessian(model, Probe.from_samples(data, batch_size=4), _half_squared_error)
    d = filter_normalized_directions(op.parameters, seed=0)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call(op, d)
