"""The error-controlled RK4 step rule and the λ_min solve, against closed forms."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_landscape.measures._compat import LambdaOperator
from lightning_landscape.measures.flow_steps import (
    gd_relative_deviation,
    lambda_min,
    rk4_relative_error,
    substeps_for,
    window_substeps,
)

F64 = torch.float64


def test_the_error_model_is_exact_for_rk4_and_gd_on_one_mode() -> None:
    """RK4 on θ̇ = −λθ is θ ← R(−hλ)θ; GD is θ ← (1 − ηλ)θ: both against e^{−λT}."""
    for lam, time, n in ((2.0, 1.5, 7), (-3.0, 1.0, 9), (0.3, 40.0, 25), (1e-4, 2.0, 1)):
        x = -time * lam / n
        rk4 = (1 + x + x * x / 2 + x**3 / 6 + x**4 / 24) ** n
        exact = math.exp(-lam * time)
        assert rk4_relative_error(n, time, lam) == pytest.approx(abs(rk4 / exact - 1), rel=1e-6)
    for z, k in ((0.05, 20), (0.01, 100), (-0.5, 10), (0.9, 3), (1e-5, 7)):
        gd, flow = (1 - z) ** k, math.exp(-k * z)
        assert gd_relative_deviation(z, k) == pytest.approx(abs(gd / flow - 1), rel=1e-8)
    assert gd_relative_deviation(1.0, 5) == gd_relative_deviation(1.7, 5) == 1.0
    assert rk4_relative_error(3, 0.0, 1.0) == rk4_relative_error(3, 1.0, 0.0) == 0.0


@pytest.mark.parametrize(
    "time, steps, rate, rate_min",
    [(1.0, 20, 1.0, -0.2), (1.0, 100, 1.0, 0.0), (1.0, 10, 1.0, -5.0), (2.0, 10, 1.0, 0.0),
     (10.0, 10, 1.0, 0.0), (20.0, 10, 1.0, 0.0), (3.0, 1, 2.0, -1.0), (5.0, 50, 0.3, -2.0)],
)  # fmt: skip
def test_the_rule_is_the_smallest_n_meeting_the_target_on_every_mode(
    time: float, steps: int, rate: float, rate_min: float
) -> None:
    """At ``n``: error ≤ rtol × GD deviation on every mode with ηλ < 1 (both signs), h·ρ ≤ 1;
    at ``n − 1`` one of the two fails. Checking the extremes suffices: the ratio grows with |λ|."""
    rtol, eta = 1e-3, time / steps
    n = window_substeps(time, steps, rate, rate_min)
    radius = max(rate, -rate_min)

    def worst(m: int) -> float:
        modes = [lam for lam in (rate, rate_min) if lam != 0 and lam * eta < 1]
        modes += [1 / eta] if rate * eta >= 1 else []
        return max(rk4_relative_error(m, time, x) / gd_relative_deviation(eta * x, steps)
                   for x in modes)  # fmt: skip

    assert worst(n) <= rtol and time * radius / n <= 1.0 + 1e-12
    assert n == substeps_for(time, radius, 1.0) or worst(n - 1) > rtol
    rng = random.Random(0)
    for _ in range(200):  # modes inside the spectrum (z < 1) are resolved as well
        lam = rng.uniform(rate_min, min(rate, 1 / eta))
        if lam != 0:
            ratio = rk4_relative_error(n, time, lam) / gd_relative_deviation(eta * lam, steps)
            assert ratio <= rtol * (1 + 1e-9)


def test_rule_costs_and_limits() -> None:
    """n ≈ kz/(60·rtol·z)^{1/4} unsaturated; rtol=None is the fixed cap; finer rtol, more steps."""
    assert [window_substeps(10 * z, 10, 1.0) for z in (0.2, 1.0, 2.0)] == [7, 33, 33]
    assert [window_substeps(10 * z, 10, 1.0, rtol=None) for z in (0.2, 1.0, 2.0)] == [2, 10, 20]
    for z, k in ((0.01, 100), (0.001, 1000)):
        asymptotic = k * z / (60 * 1e-3 * z) ** 0.25
        assert window_substeps(k * z, k, 1.0) == pytest.approx(asymptotic, rel=0.15)
    counts = [window_substeps(2.0, 10, 1.0, -1.0, rtol=r) for r in (1e-2, 1e-3, 1e-4)]
    assert counts[0] < counts[1] < counts[2]
    assert window_substeps(2.0, 10, 1.0, c=0.01) == 200  # the cap h·ρ ≤ c still holds
    assert window_substeps(0.0, 3, 5.0) == 1 and window_substeps(1.0, 3, 0.0) == 1
    assert window_substeps(1.0, 3, -1.0, -4.0) == window_substeps(1.0, 3, 0.0, -4.0)


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"rtol": 0.0}, "rtol"),
     ({"rtol": math.nan}, "rtol"), ({"time": -1.0}, "time"), ({"rate": math.inf}, "rate"),
     ({"rate_min": math.nan}, "rate_min"), ({"c": 3.0}, "c"), ({"c": 0.0}, "c")],
)  # fmt: skip
def test_rule_bad_arguments_name_the_argument(kwargs: dict, arg: str) -> None:
    args = {"time": 1.0, "steps": 2, "rate": 1.0, **kwargs}
    rest = {k: args.pop(k) for k in ("rtol", "c") if k in args}
    with pytest.raises(ValueError, match=f"`{arg}`"):
        window_substeps(args["time"], args["steps"], args["rate"], args.get("rate_min", 0.0),
                        **rest)  # fmt: skip


def matrix(evals: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(evals, dtype=F64)) @ q.T


@pytest.mark.parametrize(
    "evals",
    [[-5.0] + [0.01 * i for i in range(60)] + [1.0],  # negative curvature
     [1e-6 * i for i in range(60)] + [0.5, 1.0]],  # PSD, λ_min ≈ 0 in a cluster
)  # fmt: skip
def test_lambda_min_by_the_shifted_solve(evals: list[float]) -> None:
    """λ_min = σ − λ_max(σI − H), accurate relative to the width of the spectrum, never above
    the true λ_min by more than tol·width, and cheap when warm-started."""
    a = matrix(evals, 1)
    op = LambdaOperator(lambda v: a @ v, size=len(evals), dtype=F64)
    width = max(evals) - min(evals)
    got = lambda_min(op, shift=max(evals), tol=1e-2, max_iter=40)
    assert got.value <= min(evals) + 1e-2 * width
    assert got.value == pytest.approx(min(evals), abs=2e-2 * width)
    again = lambda_min(op, shift=max(evals), tol=1e-2, max_iter=40, warm_start=got.vector)
    assert again.converged and again.matvecs <= max(got.matvecs, 3)
    assert again.value == pytest.approx(min(evals), abs=2e-2 * width)
