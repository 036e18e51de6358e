"""``GradientFlowDeviation``: logged values against closed forms, and the callback contract."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks import Sharpness
from lightning_landscape.callbacks.gradient_flow import (
    GradientFlowDeviation,
    effective_scale,
    optimizer_flow,
)
from lightning_landscape.optim import NovoGrad

from .helpers import Net, RecordingLogger, loader, trainer

F64 = torch.float64
TAG = "landscape/gradient_flow/"
N = 24


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- a quadratic problem trained by Lightning: least squares, full batch, float64 -----------------
def regression() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 3, generator=gen, dtype=F64)
    w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64)
    return x, x @ w + 0.3 * torch.randn(N, 1, generator=gen, dtype=F64)


def optimizer_for(params: Any, name: str, lr: float, **kw: Any) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kw)
    return torch.optim.SGD(params, lr=lr, **kw)


class LeastSquares(pl.LightningModule):
    def __init__(self, name: str = "sgd", lr: float = 0.1, **kw: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1).double()
        self.name, self.lr, self.kw = name, lr, kw

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.lin(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer_for(self.parameters(), self.name, self.lr, **self.kw)


def reference(name: str, lr: float, steps: int, **kw: Any) -> tuple[list, list, torch.Tensor, Any]:
    """θ_s (s = 0..steps) and the optimizer states of the same run with the exact gradient."""
    x, y = regression()
    z = torch.cat([x, torch.ones(N, 1, dtype=F64)], 1)
    a, b = 2 * z.T @ z / N, 2 * z.T @ y[:, 0] / N  # L = ½θᵀAθ − bᵀθ + const
    init = LeastSquares()
    theta = nn.Parameter(torch.cat([init.lin.weight.detach()[0], init.lin.bias.detach()]))
    opt = optimizer_for([theta], name, lr, **kw)
    thetas, states = [theta.detach().clone()], [None]
    for _ in range(steps):
        theta.grad = a @ theta.detach() - b
        opt.step()
        thetas.append(theta.detach().clone())
        st = opt.state[theta]
        states.append({k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()})
    return thetas, states, a, b


def train(
    cb: GradientFlowDeviation, name: str, lr: float, steps: int, **kw: Any
) -> RecordingLogger:
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(*regression()), batch_size=N, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([cb], logger=log, max_steps=steps).fit(LeastSquares(name, lr, **kw), data)
    return log


CASES = {  # name, lr, optimizer kwargs, κ (effective step / lr)
    "gd-small": ("sgd", 0.02, {}, 1.0),
    "gd-large": ("sgd", 0.7, {}, 1.0),  # ηλ_max = 1.83
    "heavy-ball-wd": ("sgd", 0.01, {"momentum": 0.9, "weight_decay": 0.05}, 10.0),
    "nesterov": ("sgd", 0.01, {"momentum": 0.5, "nesterov": True}, 2.0),
    "damped": ("sgd", 0.02, {"momentum": 0.5, "dampening": 0.5}, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_values_equal_the_closed_forms(case: str) -> None:
    """θ(t) = θ* + exp(−Mt)(θ_s − θ*) with M = A + wd·I, time T = k·κ·lr."""
    name, lr, kw, kappa = CASES[case]
    cb = GradientFlowDeviation(settle_steps=0, every_n_steps=3, probe_size=N, window=4, window_every_n_steps=5,
                               rk4_c=0.05, tol=1e-8, max_iter=4)  # fmt: skip
    log = train(cb, name, lr, 14, **kw)
    thetas, _, a, b = reference(name, lr, 14, **kw)
    m = a + kw.get("weight_decay", 0.0) * torch.eye(4, dtype=F64)
    star = torch.linalg.solve(m, b)
    eta = kappa * lr
    gaps = log.series(TAG + "step_gap")
    assert sorted(gaps) == [0, 3, 6, 9, 12]
    for s, got in gaps.items():
        r = m @ thetas[s] - b
        assert got == pytest.approx(0.5 * eta * float((m @ r).norm() / r.norm()), rel=1e-10)
    devs = log.series(TAG + "deviation")
    assert sorted(devs) == [4, 9, 14]
    assert log.series(TAG + "window_steps") == {4: 4.0, 9: 4.0, 14: 4.0}
    for end, got in devs.items():
        start = thetas[end - 4]
        flow = star + torch.linalg.matrix_exp(-m * (4 * eta)) @ (start - star)
        exact = float((thetas[end] - flow).norm() / (flow - start).norm())
        assert got == pytest.approx(exact, rel=1e-5), (end, got, exact)
    if case.startswith("gd"):  # ηλ_max 0.05 stays near the flow; 1.83 does not (closed form)
        assert (max(devs.values()) < 0.03) if case == "gd-small" else (devs[14] > 0.4)


def test_adam_uses_its_frozen_bias_corrected_preconditioner() -> None:
    """Adam: θ̇ = −P⁻¹∇L with P = √(v/(1−β2^t)) + ε frozen at the snapshot, time k·lr."""
    lr, betas = 0.05, (0.9, 0.999)
    cb = GradientFlowDeviation(settle_steps=0, every_n_steps=3, probe_size=N, window=4, window_every_n_steps=5,
                               rk4_c=0.05, tol=1e-8, max_iter=4)  # fmt: skip
    with pytest.warns(UserWarning, match="no state yet"):
        log = RecordingLogger()
        pl.seed_everything(0, verbose=False)
        data = DataLoader(TensorDataset(*regression()), batch_size=N, shuffle=False)
        trainer([cb], logger=log, max_steps=14).fit(LeastSquares("adam", lr, betas=betas), data)
    thetas, states, a, b = reference("adam", lr, 14, betas=betas)
    star = torch.linalg.solve(a, b)

    def p_eff(s: int) -> torch.Tensor:
        st = states[s]
        t = float(st["step"])
        return (st["exp_avg_sq"] / (1 - betas[1] ** t)).sqrt() + 1e-8

    gaps = log.series(TAG + "step_gap")
    assert sorted(gaps) == [3, 6, 9, 12]  # no P before the first step
    for s, got in gaps.items():
        f = -(a @ thetas[s] - b) / p_eff(s)
        exact = 0.5 * lr * float(((a @ f) / p_eff(s)).norm() / f.norm())
        assert got == pytest.approx(exact, rel=1e-10)
    devs = log.series(TAG + "deviation")
    assert sorted(devs) == [9, 14]  # the window due at step 0 could not start
    for end, got in devs.items():
        s = end - 4
        mm = a / p_eff(s)[:, None]
        flow = star + torch.linalg.matrix_exp(-mm * (4 * lr)) @ (thetas[s] - star)
        exact = float((thetas[end] - flow).norm() / (flow - thetas[s]).norm())
        assert got == pytest.approx(exact, rel=1e-5)


# -- the optimizer rules -------------------------------------------------------------------------
def test_effective_scale_and_flow_of_each_optimizer() -> None:
    w = nn.Parameter(torch.ones(3, dtype=F64))
    u = nn.Parameter(torch.ones(2, dtype=F64))
    sgd = torch.optim.SGD
    assert effective_scale(sgd([w], lr=0.1)) == 1.0
    assert effective_scale(sgd([w], lr=0.1, momentum=0.9)) == pytest.approx(10.0)
    assert effective_scale(sgd([w], lr=0.1, momentum=0.9, dampening=0.9)) == pytest.approx(1.0)
    assert effective_scale(sgd([w], lr=0.1, momentum=0.8, nesterov=True)) == pytest.approx(5.0)
    assert effective_scale(sgd([w], lr=0.1, momentum=0.5, dampening=1.0)) is None
    assert effective_scale(torch.optim.RMSprop([w])) is None
    assert effective_scale(NovoGrad([w], betas=(0.9, 0.98))) == pytest.approx(10.0)
    assert effective_scale(NovoGrad([w], betas=(0.9, 0.98), grad_averaging=True)) == 1.0
    assert optimizer_flow(torch.optim.RMSprop([w]), [w]) is None
    # SGD, two groups: the second group's lr ratio goes into P⁻¹; L2 decay is coupled
    opt = sgd([{"params": [w]}, {"params": [u], "lr": 0.05}], lr=0.1, weight_decay=0.01)
    flow, _ = optimizer_flow(opt, [w, u])
    torch.testing.assert_close(flow.inverse, torch.tensor([1, 1, 1, 0.5, 0.5], dtype=F64))
    torch.testing.assert_close(flow.coupled, torch.full((5,), 0.01, dtype=F64))
    assert flow.decoupled is None
    assert optimizer_flow(sgd([w], lr=0.1), [w])[0].inverse is None  # plain GD: P = I
    # AdamW: P = √v̂ + ε without Adam's (1 − β1^t); decoupled decay scaled by the group lr ratio
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [u], "lr": 0.02}], lr=0.01,
                            weight_decay=0.1, eps=1e-3)  # fmt: skip
    assert optimizer_flow(opt, [w, u])[0] is None  # before the first step
    for t in range(3):
        w.grad, u.grad = torch.full_like(w, 1.0 + t), torch.full_like(u, -2.0)
        opt.step()
    flow, _ = optimizer_flow(opt, [w, u])
    vw = opt.state[w]["exp_avg_sq"] / (1 - 0.999**3)
    vu = opt.state[u]["exp_avg_sq"] / (1 - 0.999**3)
    expected = torch.cat([vw.sqrt() + 1e-3, (vu.sqrt() + 1e-3) / 2])  # η_u/η_ref = 2
    torch.testing.assert_close(flow.inverse, expected.reciprocal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(flow.decoupled, torch.tensor([0.1] * 3 + [0.2] * 2, dtype=F64))
    assert flow.coupled is None
    # a parameter the optimizer does not manage is frozen
    frozen = nn.Parameter(torch.ones(1, dtype=F64))
    assert float(optimizer_flow(opt, [w, frozen])[0].inverse[-1]) == 0.0


# -- the callback contract -----------------------------------------------------------------------
def fit(callbacks: list[Any], model: Any = None, logger: Any = None, **kw: Any) -> Any:
    pl.seed_everything(0, verbose=False)
    model = model or Net()
    t = trainer(callbacks, logger=logger, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader())
    return model, t


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_observer_effect_and_shared_lambda_max_untouched() -> None:
    """BN + dropout + shuffled batches + momentum: bit-identical weights with a window running.

    Sharpness measures at the window ends, where the window also needs λ_max (shared solve):
    Sharpness's values are those of a run without this callback.
    """
    ref_log = RecordingLogger()
    ref, _ = fit([Sharpness(every_n_steps=4, probe_size=40)], logger=ref_log)
    log = RecordingLogger()
    cbs = [
        Sharpness(every_n_steps=4, probe_size=40),
        GradientFlowDeviation(
            settle_steps=0,
            every_n_steps=3,
            probe_size=40,
            probe_batch_size=16,
            window=4,
            window_every_n_steps=4,
        ),  # fmt: skip
    ]
    got, _ = fit(cbs, logger=log)
    a, b = weights(ref), weights(got)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sorted(log.series(TAG + "deviation")) == [4, 8, 12]
    lam, lam_ref = (
        log.series("landscape/sharpness/lambda_max"),
        ref_log.series("landscape/sharpness/lambda_max"),
    )
    assert lam.keys() == lam_ref.keys()
    for s in lam:
        assert lam[s] == pytest.approx(lam_ref[s], rel=2e-3), s


def test_resume_mid_window_equals_uninterrupted(tmp_path) -> None:
    """Windows [0, 4] and [6, 10]; the checkpoint at step 8 falls inside the second one."""

    def run(max_steps: int, logger: Any, callbacks: list[Any], ckpt_path: str | None = None) -> Any:
        pl.seed_everything(0, verbose=False)
        model = Net(dropout=0.0)
        t = trainer(callbacks, logger=logger, max_steps=max_steps,
                    enable_checkpointing=bool(ckpt_path is None and len(callbacks) > 1))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, loader(64, shuffle=False), ckpt_path=ckpt_path)
        return model

    def make() -> GradientFlowDeviation:
        return GradientFlowDeviation(settle_steps=0, every_n_steps=2, probe_size=32, window=4,
                                     window_every_n_steps=6)  # fmt: skip

    log_full = RecordingLogger()
    full = run(12, log_full, [make()])
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    log_a, log_b = RecordingLogger(), RecordingLogger()
    run(8, log_a, [make(), ckpt_cb])
    ckpt = next(tmp_path.glob("*step=8*.ckpt"))
    saved = next(
        v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
        if k.startswith("GradientFlowDeviation")
    )  # fmt: skip
    assert saved["window"]["start"] == 6 and len(saved["window"]["times"]) == 2
    assert "window_start" in saved["vectors"]
    cb_b = make()
    resumed = run(12, log_b, [cb_b], ckpt_path=str(ckpt))
    assert sorted(log_full.series(TAG + "deviation")) == [4, 10]
    for tag in log_full.tags():
        if tag.startswith("landscape/"):
            want = log_full.series(tag)
            got = {**log_a.series(tag), **log_b.series(tag)}
            assert got.keys() == want.keys(), tag
            for s in want:
                assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-9), (tag, s)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k


def test_non_finite_windows_and_gaps_are_skipped_training_goes_on() -> None:
    log = RecordingLogger()
    cb = GradientFlowDeviation(
        settle_steps=0, every_n_steps=2, probe_size=32, window=2, window_every_n_steps=4
    )
    _, t = fit([cb], model=Net(nan_at_step=5), logger=log, max_steps=10)
    assert t.global_step == 10
    assert sorted(log.series(TAG + "deviation")) == [2]
    skipped = log.series(TAG + "skipped")
    assert skipped == {6: 1.0, 8: 2.0, 10: 3.0} and cb.skipped == 3
    assert not cb.windows.is_open and "window_start" not in cb.vectors


def test_unknown_optimizer_warns_once_and_uses_lr() -> None:
    log = RecordingLogger()
    cb = GradientFlowDeviation(
        settle_steps=0, every_n_steps=2, probe_size=32, window=2, window_every_n_steps=4
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.seed_everything(0, verbose=False)
        trainer([cb], logger=log, max_steps=6).fit(Net(optimizer="rmsprop", lr=1e-3), loader())
    assert sum("no flow rule is known for RMSprop" in str(w.message) for w in caught) == 1
    assert sorted(log.series(TAG + "step_gap")) == [0, 2, 4, 6]
    assert sorted(log.series(TAG + "deviation")) == [2, 6]


def test_window_cost_is_charged_to_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    cb = GradientFlowDeviation(
        settle_steps=0, every_n_steps=100, probe_size=32, window=2, window_every_n_steps=4
    )
    recorded: list[int] = []
    real = cb.cadence.record
    monkeypatch.setattr(
        cb.cadence, "record", lambda s: (recorded.append(max(cb._last_step, 0)), real(s))
    )
    fit([cb], max_steps=10)
    assert recorded == [0, 2, 6, 10]  # step 0: step_gap; 2, 6, 10: window ends
    assert cb.cadence.spent > 0 and cb.seconds == pytest.approx(cb.cadence.spent)


def test_fast_dev_run_does_nothing() -> None:
    cb = GradientFlowDeviation(settle_steps=0, every_n_steps=1, window=1, window_every_n_steps=1)
    fit([cb], fast_dev_run=2)
    assert cb.probe is None and cb.last_metrics == {} and not cb.windows.is_open


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"window": -1}, "window"),
        ({"window": 2.0}, "window"),
        ({"window": 3}, "window_every_n_steps"),
        ({"window": 3, "window_every_n_steps": 2}, "window_every_n_steps"),
        ({"window_every_n_steps": 5}, "window_every_n_steps"),
        ({"rk4_c": 0.0}, "rk4_c"),
        ({"rk4_c": 3.0}, "rk4_c"),
        ({"rk4_c": math.nan}, "rk4_c"),
        ({"rtol": 0.0}, "rtol"),
        ({"rtol": math.inf}, "rtol"),
        ({"rtol": "1e-3"}, "rtol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_substeps": 0}, "max_substeps"),
        ({"tol": -1.0}, "tol"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"probe_size": 0}, "probe_size"),
        ({"bn": "train"}, "bn"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`"):
        GradientFlowDeviation(settle_steps=0, **kwargs)
