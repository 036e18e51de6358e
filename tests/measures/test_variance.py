"""Sample-variance fractions against direct float64 computations, and the §A4 finding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_landscape.measures.guard import guard
from lightning_landscape.measures.operators import NonFiniteError
from lightning_landscape.measures.probe import Probe
from lightning_landscape.measures.variance import (
    LayerMoments,
    default_forward,
    sample_variance,
    select_modules,
)
from lightning_landscape.zoo.nets import MLP


def direct(h: torch.Tensor, unit_dim: int) -> tuple[float, float, float]:
    """(fraction, mean variance, mean second moment) of outputs ``h``, units along ``unit_dim``."""
    h = h.movedim(unit_dim, -1).reshape(-1, h.shape[unit_dim]).double()
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)  # population variance over all samples
    second = var + mean**2
    return float(var.mean() / second.mean()), float(var.mean()), float(second.mean())


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).double()


def images(n: int = 13, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64) + 0.5  # not centred


def test_conv2d_and_linear_equal_a_direct_computation() -> None:
    net, x = conv_net(), images()
    probe = Probe.from_samples((x, torch.zeros(13)), batch_size=5)  # batches of 5, 4, 4
    got = sample_variance(net, probe)
    assert got.names == ("0", "3", "5")
    with torch.no_grad():
        h0 = net[0](x)
        h3 = net[3](net[2](net[1](h0)))
        h5 = net[5](net[4](h3))
    expected = [direct(h0, 1), direct(h3, -1), direct(h5, -1)]
    for i, (f, v, s) in enumerate(expected):
        assert got.fractions[i] == pytest.approx(f, rel=1e-12)
        assert got.variance[i] == pytest.approx(v, rel=1e-12)
        assert got.second_moment[i] == pytest.approx(s, rel=1e-12)
    assert got.num_samples == (13 * 16, 13, 13)  # conv: every position is a sample
    assert got.last_over_first == pytest.approx(expected[2][0] / expected[0][0], rel=1e-12)
    assert got.as_dict() == dict(zip(got.names, got.fractions))
    # the test can fail: averaging the batches' own fractions is measurably different
    per_batch = [sample_variance(net, [b]).fractions[1] for b in probe]
    assert abs(sum(per_batch) / 3 - got.fractions[1]) > 1e-3
    # so can it with an unbiased variance: v·N/(N−1) changes the fraction
    assert abs(expected[1][1] * 13 / 12 / (expected[1][2]) - got.fractions[1]) > 1e-3


def test_conv1d_conv3d_and_sequence_linear_units() -> None:
    torch.manual_seed(0)
    conv1, conv3, lin = nn.Conv1d(2, 3, 2), nn.Conv3d(1, 2, 2), nn.Linear(4, 3)
    x1 = torch.randn(6, 2, 5, dtype=torch.float64) + 1.0
    x3 = torch.randn(6, 1, 3, 3, 3, dtype=torch.float64) - 0.5
    seq = torch.randn(6, 7, 4, dtype=torch.float64) + 2.0  # (N, positions, features)
    for module, x, dim, samples in (
        (conv1, x1, 1, 6 * 4),
        (conv3, x3, 1, 6 * 8),
        (lin, seq, -1, 42),
    ):
        module.double()
        got = sample_variance(module, [x[:4], x[4:]])
        with torch.no_grad():
            f, _, _ = direct(module(x), dim)
        assert got.names == ("",)
        assert got.fractions[0] == pytest.approx(f, rel=1e-12)
        assert got.num_samples == (samples,)
        assert got.last_over_first == 1.0


class _Shuffled(nn.Module):
    """Registered a, b, c; runs c, a, b (and skips d)."""

    def __init__(self) -> None:
        super().__init__()
        for name in "abcd":
            self.add_module(name, nn.Linear(3, 3))
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(torch.relu(self.c(x)))))


def test_forward_order_named_modules_and_hooks_removed() -> None:
    torch.manual_seed(0)
    net = _Shuffled().double()
    x = torch.randn(20, 3, dtype=torch.float64)
    got = sample_variance(net, [x])
    assert got.names == ("c", "a", "b")  # forward order; `d` never ran
    named = sample_variance(net.eval(), [x], modules=["b", "norm"])
    assert named.names == ("norm", "b")  # forward order, whatever the order given
    with torch.no_grad():
        out = net.norm(net.a(torch.relu(net.c(x))))
    assert named.fractions[0] == pytest.approx(direct(out, 1)[0], rel=1e-12)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="did not run in forward: \\['d'\\]"):
        sample_variance(net, [x], modules=["a", "d"])
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError):  # a failing forward removes the hooks too
        sample_variance(net, [torch.randn(4, 5, dtype=torch.float64)])
    assert all(not m._forward_hooks for m in net.modules())


def test_bad_arguments_name_the_argument() -> None:
    net = conv_net()
    with pytest.raises(ValueError, match="`modules` names modules the model does not have"):
        select_modules(net, ["0", "nope"])
    with pytest.raises(ValueError, match="`modules` must be a non-empty list"):
        select_modules(net, "0")
    with pytest.raises(ValueError, match="`modules` must be a non-empty list"):
        select_modules(net, [])
    with pytest.raises(ValueError, match="has no nn.Linear or nn.Conv1d/2d/3d"):
        select_modules(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="`units` must be a non-empty list of positive ints"):
        LayerMoments([3, 0])
    with pytest.raises(TypeError, match="pass `forward"):
        default_forward(net, {"x": images()})
    with pytest.raises(ValueError, match="module '' returned tuple"):
        sample_variance(_Pair(), [torch.ones(2, 2)], modules=[""])


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_constant_and_non_finite_outputs() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(1.0)
        net[2].weight.zero_()
        net[2].bias.zero_()
    got = sample_variance(net, [torch.randn(8, 2, dtype=torch.float64)])
    assert got.fractions == (0.0, 0.0)  # identical samples; all-zero outputs count as 0 too
    assert math.isnan(got.last_over_first)
    bad = torch.randn(8, 2, dtype=torch.float64)
    bad[3, 1] = float("nan")
    fresh = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with pytest.raises(NonFiniteError, match="non-finite activations"):
        sample_variance(fresh, [torch.randn(4, 2, dtype=torch.float64), bad])


def test_float32_model_accumulates_in_float64() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(200, 4) * 1e-3 + 100.0  # f ≈ 1e-10: float32 sums would cancel to garbage
    got = sample_variance(lin, [x[:100], x[100:]])
    with torch.no_grad():
        f, _, _ = direct(lin(x), -1)
    assert 0 < f < 1e-6
    assert got.fractions[0] == pytest.approx(f, rel=1e-6)


def _decay(batchnorm: bool, seed: int) -> list[float]:
    torch.manual_seed(seed)
    net = MLP(256, 1, depth=20, width=256, batchnorm=batchnorm, init="he")
    x = torch.randn(256, 256)  # centred Gaussian inputs
    with guard(net, bn="batch"):
        res = sample_variance(net, Probe.from_samples(x, batch_size=256))
    assert len(res.fractions) == 21  # 20 hidden layers + the output layer
    return list(res.fractions[:20])


def test_he_init_relu_mlp_decays_and_batchnorm_does_not() -> None:
    """docs/theory/sample_variance.md: f ≈ 0.999, 0.69, 0.34, 0.15, 0.085 at layers 1, 2, 5, 10, 20 (width 256,
    depth 20); with BatchNorm ≈ 0.69 from layer 2 on. Loose bands, mean of three nets."""
    seeds = (0, 1, 2)
    plain = [sum(v) / len(seeds) for v in zip(*(_decay(False, s) for s in seeds))]
    bands = {1: (0.99, 1.0), 2: (0.6, 0.76), 5: (0.25, 0.45), 10: (0.09, 0.26), 20: (0.04, 0.16)}
    for layer, (lo, hi) in bands.items():
        assert lo < plain[layer - 1] < hi, (layer, plain[layer - 1])
    assert plain[19] / plain[0] < 0.2
    norm = [sum(v) / len(seeds) for v in zip(*(_decay(True, s) for s in seeds))]
    assert 0.99 < norm[0] <= 1.0
    assert all(0.6 < f < 0.8 for f in norm[1:]), norm
    assert norm[19] / norm[0] > 0.6
    assert abs(sum(norm[1:]) / 19 - (1 - 1 / math.pi)) < 0.05
