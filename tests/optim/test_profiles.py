"""Optimizer profiles: one registration serves every measurement; built-in fields; no import circle.

The user-defined optimizer below is the example of ``docs/guides/register_optimizer.md``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lightning_landscape.optim as optim_pkg
from lightning_landscape.callbacks import GradientFlowDeviation, Sharpness
from lightning_landscape.callbacks.optimizer_flow import optimizer_flow
from lightning_landscape.optim import (
    ARSG,
    RSG,
    KFACPreconditioner,
    Momentum,
    NovoGrad,
    OptimizerProfile,
    Stability,
    WeightDecay,
    profile_for,
    register_optimizer,
    register_stability,
)
from lightning_landscape.optim.kfac import KFACProfile
from lightning_landscape.optim.profiles_torch import ADAM_PROFILE, SGD_PROFILE

from ..callbacks.helpers import Net, RecordingLogger, loader, trainer

DT = torch.float64
SHARP, FLOW = "landscape/sharpness/", "landscape/gradient_flow/"


# -- a user-defined optimizer, registered once (the guide's example) ------------------------------
class HeavyBall(torch.optim.Optimizer):
    """``b ← βb + g``, ``θ ← θ − ηb``: torch's SGD(momentum=β) written from scratch."""

    def __init__(self, params: Iterable[Any], lr: float = 0.05, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = torch.clone(p.grad).detach()
                else:
                    state["buf"].mul_(group["beta"]).add_(p.grad)
                p.add_(state["buf"], alpha=-group["lr"])
        return loss


def heavy_ball_stability(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Stability | None:
    lr, beta = (float(optimizer.param_groups[0][k]) for k in ("lr", "beta"))
    if len(optimizer.param_groups) > 1 or not (lr > 0 and 0 <= beta < 1):
        return None  # one group only, in the analysed range
    momentum = Momentum("heavy_ball", beta=beta)
    return Stability(
        threshold=momentum.threshold(lr),  # (2+2β)/η
        preconditioned=False,
        preconditioner=None,  # P = I
        rule=f"heavy ball (2+2β)/η, β={beta:g}, η={lr:g}",
        momentum=momentum,
    )


HEAVY_BALL = OptimizerProfile(
    name="HeavyBall",
    stability=heavy_ball_stability,
    effective_scale=lambda opt: 1.0 / (1.0 - float(opt.param_groups[0]["beta"])),
    weight_decay=WeightDecay.NONE,
)
register_optimizer(HeavyBall, HEAVY_BALL)


class _Module(Net):
    def __init__(self, make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> None:
        super().__init__(dropout=0.0)
        self.make = make

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _fit(make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> RecordingLogger:
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    log = RecordingLogger()
    cbs = [
        Sharpness(every_n_steps=4, probe_size=40, settle_steps=0),
        GradientFlowDeviation(
            every_n_steps=3,
            probe_size=40,
            probe_batch_size=16,
            settle_steps=0,
            window=4,
            window_every_n_steps=4,
        ),  # fmt: skip
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(cbs, logger=log).fit(_Module(make), loader())
    return log


def test_a_registered_optimizer_gets_sharpness_and_gradient_flow() -> None:
    log = _fit(lambda ps: HeavyBall(ps, lr=0.05, beta=0.9))
    thr = log.series(SHARP + "threshold")
    assert sorted(thr) == [0, 4, 8, 12] and all(v == pytest.approx(76.0) for v in thr.values())
    lam, ratio = log.series(SHARP + "lambda_max"), log.series(SHARP + "ratio")
    assert ratio.keys() == lam.keys() and all(ratio[s] == lam[s] / thr[s] for s in ratio)
    assert sorted(log.series(FLOW + "step_gap")) == [0, 3, 6, 9, 12]
    assert sorted(log.series(FLOW + "deviation")) == [4, 8, 12]
    # the same numbers as torch's SGD with the same momentum: the profile says the same things
    ref = _fit(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for tag in ("threshold", "ratio", "lambda_max"):
        assert log.series(SHARP + tag) == pytest.approx(ref.series(SHARP + tag), rel=1e-6), tag
    for tag in ("step_gap", "deviation", "window_steps"):
        assert log.series(FLOW + tag) == pytest.approx(ref.series(FLOW + tag), rel=1e-6), tag


def test_register_stability_is_a_profile_with_a_threshold_only() -> None:
    class Legacy(torch.optim.Optimizer):
        def __init__(self, params: Iterable[Any]) -> None:
            super().__init__(params, {"lr": 0.1})

        def step(self, closure: object = None) -> None:  # type: ignore[override]
            return None

    register_stability(Legacy, lambda opt, ps: Stability(1.0, False, None, "custom"))
    w = nn.Parameter(torch.ones(2))
    profile = profile_for(Legacy([w]))
    assert profile is not None and profile.effective_scale is None
    assert profile.stability(Legacy([w]), [w]) == Stability(1.0, False, None, "custom")
    assert optimizer_flow(Legacy([w]), [w]) is None  # no flow rule: the plain flow is used

    # replacing the rule of a registered class keeps the rest of its profile
    class Mine(torch.optim.SGD):
        pass

    register_stability(Mine, lambda opt, ps: None)
    mine = profile_for(Mine([w], lr=0.1))
    assert mine is not None and mine.effective_scale is SGD_PROFILE.effective_scale


def test_bad_registrations_name_the_argument() -> None:
    with pytest.raises(TypeError, match="optimizer_cls"):
        register_optimizer(int, HEAVY_BALL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="profile"):
        register_optimizer(HeavyBall, heavy_ball_stability)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`name`.*''"):
        OptimizerProfile(name="", stability=heavy_ball_stability)
    with pytest.raises(TypeError, match="`stability`"):
        OptimizerProfile(name="x", stability=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`weight_decay`.*'coupled'"):
        OptimizerProfile(name="x", stability=heavy_ball_stability, weight_decay="coupled")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`form`.*'adam'"):
        Momentum("adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        profile_for(3)  # type: ignore[arg-type]


# -- the built-in profiles against the formulas --------------------------------------------------
@pytest.mark.parametrize(
    ("momentum", "formula"),
    [
        (Momentum("none"), lambda lr: 2 / lr),
        (Momentum("heavy_ball", beta=0.9), lambda lr: (2 + 2 * 0.9) / lr),
        (Momentum("heavy_ball", beta=0.8, dampening=0.3), lambda lr: 3.6 / (0.7 * lr)),
        (Momentum("heavy_ball", beta=0.8, dampening=1.0), lambda lr: math.inf),
        (Momentum("nesterov", beta=0.9), lambda lr: 3.8 / (2.8 * lr)),
        (Momentum("ema", beta=0.9), lambda lr: 3.8 / (0.1 * lr)),
        (Momentum("rsg", beta=0.9, observation=0.1), lambda lr: 3.8 / (lr * (0.1 + 0.18))),
    ],
)
def test_momentum_thresholds(momentum: Momentum, formula: Callable[[float], float]) -> None:
    assert momentum.threshold(0.1) == pytest.approx(formula(0.1), rel=1e-12)


def _stepped(opt: torch.optim.Optimizer, ps: list[nn.Parameter], steps: int = 3) -> None:
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = p.detach() * (1.5 + i) + 0.1 * (t + 1)
        opt.step()


def test_builtin_profile_fields() -> None:
    w, u = nn.Parameter(torch.rand(3, dtype=DT)), nn.Parameter(torch.rand(2, dtype=DT))
    cases: list[tuple[torch.optim.Optimizer, str, Momentum, WeightDecay, float]] = [
        (torch.optim.SGD([w], lr=0.1), "torch.optim.SGD", Momentum("none"), WeightDecay.NONE, 1),
        (torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1), "torch.optim.SGD",
         Momentum("heavy_ball", 0.9), WeightDecay.COUPLED, 10),
        (torch.optim.SGD([w], lr=0.1, momentum=0.8, nesterov=True), "torch.optim.SGD",
         Momentum("nesterov", 0.8), WeightDecay.NONE, 5),
        (torch.optim.Adam([w], lr=0.01, weight_decay=0.1), "torch.optim.Adam",
         Momentum("ema", 0.9), WeightDecay.COUPLED, 1),
        (torch.optim.AdamW([w], lr=0.01), "torch.optim.Adam",
         Momentum("ema", 0.9), WeightDecay.DECOUPLED, 1),
        (RSG([w], lr=0.1, beta=0.8, observation=0.3, weight_decay=0.01),
         "lightning_landscape.optim.RSG", Momentum("rsg", 0.8, observation=0.3),
         WeightDecay.COUPLED, 1),
        (NovoGrad([w], lr=0.01, betas=(0.9, 0.98), weight_decay=0.1),
         "lightning_landscape.optim.NovoGrad", Momentum("heavy_ball", 0.9),
         WeightDecay.PRECONDITIONED, 10),
        (NovoGrad([w], lr=0.01, betas=(0.9, 0.98), grad_averaging=True),
         "lightning_landscape.optim.NovoGrad", Momentum("ema", 0.9), WeightDecay.NONE, 1),
        (ARSG([w], lr=0.01, amsgrad=True, weight_decay=0.1), "lightning_landscape.optim.ARSG",
         Momentum("rsg", 0.999, observation=0.1), WeightDecay.COUPLED, 1),
    ]  # fmt: skip
    for opt, name, momentum, kind, kappa in cases:
        profile = profile_for(opt)
        assert profile is not None and profile.name == name
        st = profile.stability(opt, [w])
        assert st is not None and st.momentum == momentum and st.weight_decay is kind, name
        assert st.threshold == momentum.threshold(float(opt.param_groups[0]["lr"]))
        assert profile.kappa(opt) == pytest.approx(kappa, rel=1e-12), name
        assert profile.needs_state is isinstance(opt, (torch.optim.Adam, ARSG, NovoGrad))
        assert not profile.operator
    # the group's kind: Adam's flag, per group
    groups: list[dict[str, Any]] = [
        {"params": [w]},
        {"params": [u], "decoupled_weight_decay": True},
    ]
    adam = torch.optim.Adam(groups)
    kinds = [ADAM_PROFILE.decay_kind(adam, g) for g in adam.param_groups]
    assert kinds == [WeightDecay.COUPLED, WeightDecay.DECOUPLED]


def test_builtin_bias_corrections() -> None:
    w = nn.Parameter(torch.rand(3, dtype=DT))
    adam = torch.optim.Adam([w], lr=0.01, betas=(0.8, 0.99))
    arsg = ARSG([w], lr=0.01, betas=(0.8, 0.99), observation=0.3, amsgrad=False)
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for opt in (adam, arsg, sgd):
        profile = profile_for(opt)
        assert profile is not None
        assert profile.flow_factor(opt, opt.param_groups[0], {}) == 1.0  # before the first step
        _stepped(opt, [w])
    g = adam.param_groups[0]
    assert profile_for(adam).flow_factor(adam, g, adam.state[w]) == pytest.approx(1 / (1 - 0.8**3))  # type: ignore[union-attr]
    g = arsg.param_groups[0]
    k3 = 0.7 / (1 - 0.8**3) + 0.3
    assert profile_for(arsg).flow_factor(arsg, g, arsg.state[w]) == pytest.approx(k3)  # type: ignore[union-attr]
    assert profile_for(sgd).flow_factor(sgd, sgd.param_groups[0], sgd.state[w]) == 1.0  # type: ignore[union-attr]


def test_kfac_profile_wraps_the_base_profile_while_the_preconditioner_lives() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    pre = KFACPreconditioner(model, optimizer=sgd, factor_update_every=1, inverse_update_every=1)
    profile = profile_for(sgd)
    assert isinstance(profile, KFACProfile) and profile.base is SGD_PROFILE
    assert profile.operator and profile.preconditioner is pre
    assert profile.kappa(sgd) == SGD_PROFILE.kappa(sgd)
    assert profile.decay_kind(sgd, sgd.param_groups[0]) is WeightDecay.PRECONDITIONED
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    sgd.step()
    params: list[torch.Tensor] = list(model.parameters())
    st = profile.stability(sgd, params)
    base = SGD_PROFILE.stability(sgd, params)
    assert st is not None and base is not None and st.inverse_sqrt is not None
    assert st.threshold == base.threshold / pre.kl_scale
    assert st.weight_decay is WeightDecay.PRECONDITIONED and st.decay_after_preconditioning
    assert st.momentum == base.momentum == Momentum("heavy_ball", 0.9)
    flow = optimizer_flow(sgd, params)
    assert flow is not None and flow[0] is None  # an operator P: no gradient flow
    pre.remove()
    assert profile_for(sgd) is SGD_PROFILE  # removed: the class profile again
    sgd2 = torch.optim.SGD(model.parameters(), lr=0.1)
    KFACPreconditioner(model, optimizer=sgd2).remove()
    del pre
    import gc

    gc.collect()
    assert profile_for(sgd2) is SGD_PROFILE


# -- no import circle ----------------------------------------------------------------------------
def _optim_modules() -> list[str]:
    root = Path(optim_pkg.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.append("lightning_landscape." + ".".join(parts))
    return names


_ORDERS = r"""
import sys, importlib
mods = sys.argv[1:]
def fresh():
    for k in [k for k in sys.modules if k.startswith("lightning_landscape")]:
        del sys.modules[k]
for order in ([m] for m in mods):  # every module first
    fresh()
    for m in order:
        importlib.import_module(m)
for order in (mods, mods[::-1]):  # all of them, forwards and backwards
    fresh()
    for m in order:
        importlib.import_module(m)
from lightning_landscape.optim import profile_for
import torch
assert profile_for(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)) is not None
"""


def test_every_optim_module_imports_first_in_a_fresh_interpreter() -> None:
    mods = _optim_modules()
    assert "lightning_landscape.optim.kfac.preconditioner" in mods and len(mods) > 15
    for first in ("lightning_landscape.optim.kfac.preconditioner",
                  "lightning_landscape.optim.kfac.profile"):  # fmt: skip
        subprocess.run([sys.executable, "-c", f"import {first}"], check=True, timeout=300)
    subprocess.run([sys.executable, "-c", _ORDERS, *mods], check=True, timeout=600)


# -- the user guide's code runs ------------------------------------------------------------------
GUIDE = Path(__file__).parents[2] / "docs" / "guides" / "register_optimizer.md"

_GUIDE_CHECKS = r"""
import csv, glob
rows = list(csv.DictReader(open(glob.glob("landscape_logs/heavy_ball/*/metrics.csv")[0])))
def steps(tag):
    return sorted(int(r["step"]) for r in rows if r.get(tag))
assert steps("landscape/sharpness/threshold") == [0, 10, 20, 30, 40], rows
assert steps("landscape/sharpness/ratio") == [0, 10, 20, 30, 40]
assert {float(r["landscape/sharpness/threshold"]) for r in rows
        if r.get("landscape/sharpness/threshold")} == {(2 + 2 * 0.9) / 0.05}
assert steps("landscape/gradient_flow/step_gap") == [10, 20, 30, 40]
assert steps("landscape/gradient_flow/deviation") == [5, 25]
# RMSprop: P = √v + ε with the lr ratio of the second group, the flow built from it
from lightning_landscape.callbacks.optimizer_flow import optimizer_flow
from lightning_landscape.optim import profile_for
w, u = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
opt = torch.optim.RMSprop([{"params": [w]}, {"params": [u], "lr": 0.02}], lr=0.01, momentum=0.5,
                          weight_decay=0.1)
profile = profile_for(opt)
assert profile is RMSPROP and profile.kappa(opt) == 2.0
first = profile.stability(opt, [w, u])
assert first.preconditioned and first.preconditioner is None and first.threshold == 3.0 / 0.01
for t in range(3):
    w.grad, u.grad = torch.full_like(w, 1.0 + t), torch.full_like(u, -2.0)
    opt.step()
st = profile.stability(opt, [w, u])
pw = opt.state[w]["square_avg"].sqrt() + 1e-8
pu = (opt.state[u]["square_avg"].sqrt() + 1e-8) * 0.5
assert torch.equal(st.preconditioner[0], pw) and torch.equal(st.preconditioner[1], pu)
assert st.weight_decay.value == "coupled" and float(st.coupled_decay[1][0]) == 0.1
flow, _ = optimizer_flow(opt, [w, u])
torch.testing.assert_close(flow.inverse, torch.cat([pw, pu]).reciprocal())
assert flow.decoupled is None and float(flow.coupled[0]) == 0.1
print("guide ok")
"""


def test_the_guide_example_runs(tmp_path: Path) -> None:
    text = GUIDE.read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 3 and "register_optimizer(HeavyBall, HEAVY_BALL)" in blocks[1]
    code = "\n".join(blocks[1:]) + _GUIDE_CHECKS  # the first block is a one-line sketch
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "guide ok" in done.stdout
