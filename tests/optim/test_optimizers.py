"""Conformance suite of the package's optimizers (NovoGrad, RSG, ARSG), torch anchors alongside.

The exact float64 references (special cases, equations, torch-optimizer) are in
``test_optimizer_references.py``. Here: the torch.optim conventions over the whole table
(foreach/single parity, ``p.grad`` untouched, bit-identical resume, per-group hyperparameters,
closure under ``enable_grad``, 16-bit parameters, zero gradients, argument validation), then
gradient accumulation and DDP (2 gloo processes) equal to one big batch, and LightningCLI
instantiation.
"""

from __future__ import annotations

import copy
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_landscape.optim import ARSG, RSG, NovoGrad, stability_of

from ..ddp_workers import run_and_exit

DT = torch.float64
Factory = Callable[..., torch.optim.Optimizer]
# name -> (class, hyperparameters); several configurations per optimizer of the package
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "novograd": (NovoGrad, {"lr": 0.05, "betas": (0.9, 0.95)}),
    "novograd_avg_ams_wd_max": (NovoGrad, {"lr": 0.05, "grad_averaging": True, "amsgrad": True,
                                           "weight_decay": 0.01, "maximize": True}),
    "rsg": (RSG, {"lr": 0.1, "beta": 0.9, "observation": 0.2, "weight_decay": 0.01}),
    "arsg": (ARSG, {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.01}),
    "arsg_adam": (ARSG, {"lr": 0.01, "betas": (0.9, 0.99), "amsgrad": False, "observation": 0.3}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),  # torch anchors
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}  # fmt: skip


def _factory(cls: type[torch.optim.Optimizer], defaults: dict[str, Any]) -> Factory:
    """``factory(params, **overrides)``."""
    return lambda ps, **kw: cls(ps, **{**defaults, **kw})


ALL = {name: _factory(*config) for name, config in CONFIGS.items()}
OURS = {name: f for name, f in ALL.items() if name not in ("sgd", "adam")}


# ------------------------------------------------------------------------------ fixtures
def _net(seed: int = 0, dtype: torch.dtype = DT) -> list[torch.nn.Parameter]:
    """A 5 → 4 → 3 tanh MLP as four parameter tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 5), (4,), (3, 4), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=DT).to(dtype)) for s in shapes]


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randn(n, 3, generator=gen, dtype=DT)


def _loss(ps: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = ps
    out = torch.tanh(x.to(w1.dtype) @ w1.T + b1) @ w2.T + b2
    return ((out - y.to(out.dtype)) ** 2).mean()


def _grads(ps: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in ps]
        return list(torch.autograd.grad(_loss(leaves, x, y), leaves))


def _train(opt: torch.optim.Optimizer, ps: Sequence[torch.Tensor], steps: int) -> list[Any]:
    """``steps`` steps on the fixed batch; parameters after each step."""
    x, y = _data()
    out = []
    for _ in range(steps):
        for p, g in zip(ps, _grads(ps, x, y)):
            p.grad = g
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def _close(a: list[Any], b: list[Any], tol: float = 1e-12) -> None:
    for step, (xs, ys) in enumerate(zip(a, b)):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"step {step}")


# ------------------------------------------------------------------- torch.optim conventions
@pytest.mark.parametrize("name", sorted(OURS))
def test_foreach_matches_single_tensor(name: str) -> None:
    """Same trajectory, bit for bit. A float32 tensor among float64 ones (two foreach buckets);
    a parameter that skips steps joins late (first and later steps in one bucket)."""
    x, y = _data()
    runs = []
    for foreach in (False, True):
        ps = _net()
        ps[1] = torch.nn.Parameter(ps[1].detach().float())
        opt = OURS[name](ps, foreach=foreach)
        traj = []
        for k in range(8):
            for p, g in zip(ps, _grads(ps, x, y)):
                p.grad = g.to(p.dtype)
            if k < 3:
                ps[2].grad = None
            opt.step()
            traj.append([p.detach().clone() for p in ps])
        runs.append(traj)
    for a, b in zip(*runs):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), name


@pytest.mark.parametrize("name", sorted(ALL))
def test_grad_is_never_modified(name: str) -> None:
    ps = _net()
    opt = ALL[name](ps)
    x, y = _data()
    for _ in range(3):
        grads = _grads(ps, x, y)
        for p, g in zip(ps, grads):
            p.grad = g
        copies = [g.clone() for g in grads]
        opt.step()
        assert all(p.grad is g for p, g in zip(ps, grads))
        assert all(torch.equal(g, c) for g, c in zip(grads, copies))


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_dict_resume_is_bit_identical(name: str) -> None:
    ps = _net()
    opt = ALL[name](ps)
    _train(opt, ps, 4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buffer)
    straight = _train(opt, ps, 4)
    buffer.seek(0)
    saved = torch.load(buffer)
    ps2 = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt2 = ALL[name](ps2, lr=123.0)  # hyperparameters come back from the state dict
    opt2.load_state_dict(saved["opt"])
    resumed = _train(opt2, ps2, 4)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), name


@pytest.mark.parametrize("name", sorted(OURS))
def test_param_groups_with_their_own_hyperparameters(name: str) -> None:
    """Two groups with different hyperparameters = two separate optimizers."""
    special: dict[str, dict[str, Any]] = {
        "novograd": {"betas": (0.5, 0.9), "eps": 1e-3},
        "rsg": {"beta": 0.5, "observation": 0.7},
        "arsg": {"betas": (0.5, 0.9), "observation": 0.4},
    }
    extra = {"lr": 0.003, "weight_decay": 0.1, **special[name.split("_")[0]]}
    ps = _net()
    opt = OURS[name]([{"params": ps[:2]}, {"params": ps[2:], **extra}])
    together = _train(opt, ps, 6)
    ps = _net()
    a, b = OURS[name](ps[:2]), OURS[name](ps[2:], **extra)
    x, y = _data()
    for k in range(6):
        for p, g in zip(ps, _grads(ps, x, y)):
            p.grad = g
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, together[k]))


@pytest.mark.parametrize("name", sorted(ALL))
def test_closure_runs_with_grad_enabled(name: str) -> None:
    ps = _net()
    opt = ALL[name](ps)
    x, y = _data()

    def closure() -> Any:
        opt.zero_grad()
        loss = _loss(ps, x, y)
        loss.backward()
        return loss

    with torch.no_grad():  # Lightning's default path calls step(closure) like this
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert float(loss.detach()) == float(_loss(_net(), x, y).detach())
    assert not all(torch.equal(p, q) for p, q in zip(ps, _net()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OURS))
def test_16_bit_params_keep_fp32_state(name: str, dtype: torch.dtype) -> None:
    """fp32 state (also after load_state_dict); huge fp16 gradients do not overflow the norms."""
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in _net()]
    ref = [torch.nn.Parameter(p.detach().to(dtype).float()) for p in _net()]
    opts = [OURS[name](ps), OURS[name](ref)]
    x, y = _data()
    for _ in range(3):
        for p, q, g in zip(ps, ref, _grads(ref, x, y)):
            g = 1e3 * g.sign() + g  # ‖g‖² ~ 1e7 > fp16 max 65504
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        for opt in opts:
            opt.step()
    for p, q in zip(ps, ref):
        assert torch.isfinite(p).all() and p.dtype == dtype
        # the fp32-state update on 16-bit weights equals fp32 weights up to their rounding
        torch.testing.assert_close(p.float(), q, rtol=0.02, atol=0.02)
        for key, value in opts[0].state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32
                torch.testing.assert_close(value, opts[1].state[q][key], rtol=1e-2, atol=1e-6)
    saved = copy.deepcopy(opts[0].state_dict())
    fresh = OURS[name](ps)
    fresh.load_state_dict(saved)
    for i, p in enumerate(ps):
        for key, value in fresh.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32 and torch.equal(value, saved["state"][i][key])


@pytest.mark.parametrize("name", sorted(OURS))
def test_all_zero_gradient_stays_finite_and_first_step_comes_from_state(name: str) -> None:
    ps = _net()
    opt = OURS[name](ps, weight_decay=0.0)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(ps, _net()))  # zero update, finite
    _train(opt, ps, 2)
    if name.startswith("novograd"):
        v = [opt.state[p]["exp_avg_sq"].clone() for p in ps]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()  # v decays; it is not re-initialised from the zero gradient
        beta2 = opt.param_groups[0]["betas"][1]
        assert all(torch.equal(opt.state[p]["exp_avg_sq"], beta2 * w) for p, w in zip(ps, v))
    assert all(torch.isfinite(p).all() for p in ps)
    steps = 4 if name.startswith("novograd") else 3
    assert all(opt.state[p]["step"] == steps for p in ps)


BAD = [
    (NovoGrad, {"lr": -1.0}, "`lr`"), (NovoGrad, {"betas": (1.0, 0.9)}, r"`betas\[0\]`"),
    (NovoGrad, {"betas": (0.9, -0.1)}, r"`betas\[1\]`"), (NovoGrad, {"betas": 0.9}, "`betas`"),
    (NovoGrad, {"eps": 0.0}, "`eps`"), (NovoGrad, {"weight_decay": -1e-3}, "`weight_decay`"),
    (NovoGrad, {"amsgrad": 1}, "`amsgrad`"), (NovoGrad, {"grad_averaging": "yes"}, "`grad_averaging`"),
    (NovoGrad, {"lr": float("nan")}, "`lr`"), (NovoGrad, {"foreach": 1}, "`foreach`"),
    (RSG, {"lr": -0.1}, "`lr`"), (RSG, {"beta": 1.0}, "`beta`"), (RSG, {"observation": 1.5}, "`observation`"),
    (RSG, {"observation": -0.1}, "`observation`"), (RSG, {"weight_decay": -1.0}, "`weight_decay`"),
    (ARSG, {"betas": (0.9, 1.0)}, r"`betas\[1\]`"), (ARSG, {"observation": 2.0}, "`observation`"),
    (ARSG, {"eps": -1e-8}, "`eps`"), (ARSG, {"amsgrad": None}, "`amsgrad`"), (ARSG, {"lr": "x"}, "`lr`"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "kwargs", "match"), BAD)
def test_bad_hyperparameters_name_the_argument(
    cls: type, kwargs: dict[str, Any], match: str
) -> None:
    base = {"lr": 0.1} if cls is RSG else {}
    with pytest.raises(ValueError, match=match):
        cls(_net(), **{**base, **kwargs})
    opt = cls(_net()[:2], **base)  # a param group with its own bad value is refused too
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _net()[2:], **kwargs})
    assert len(opt.param_groups) == 1


# ------------------------------------------------- accumulation, DDP, LightningCLI (Lightning)
class _Net(torch.nn.Module):
    """The MLP of :func:`_net` as a module (for DDP and Lightning)."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(_net())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.ps
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Any, y: Any) -> None:
    """Four full-batch steps on the squared error."""
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(OURS))
def test_gradient_accumulation_equals_one_big_batch(name: str) -> None:
    """Lightning, ``accumulate_grad_batches=3`` on batches of 4 = batches of 12 (float64)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return ((self.net(batch[0]) - batch[1]) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return OURS[name](self.parameters())

    def fit(batch_size: int, accumulate: int) -> list[torch.Tensor]:
        module = Module()
        trainer = pl.Trainer(
            accelerator="cpu", precision="64-true", max_steps=3, logger=False,
            accumulate_grad_batches=accumulate, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        x, y = _data(36)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader)
        assert trainer.global_step == 3
        return [p.detach().clone() for p in module.net.ps]

    big, accumulated = fit(12, 1), fit(4, 3)
    assert not any(torch.equal(p, q) for p, q in zip(big, _net()))
    _close([big], [accumulated])


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Each rank trains on its half of the batch under DDP; saves its parameters."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data(16)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        results = {}
        for name in sorted(OURS):
            net = _Net()
            ddp = DistributedDataParallel(net)
            _steps(ddp, OURS[name](ddp.parameters()), x[shard], y[shard])
            results[name] = [p.detach().clone() for p in net.ps]
        torch.save(results, f"{out}/rank{rank}.pt")
        # both ranks done with the group before either tears it down: a rank leaving while
        # the other still talks to it aborted the other (SIGABRT, ~1 run in 6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_union(tmp_path: Path) -> None:
    world = 2
    ctx = torch.multiprocessing.start_processes(
        run_and_exit, args=(_ddp_worker, world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world, join=False, start_method="spawn",
    )  # fmt: skip
    start = time.monotonic()
    while not ctx.join(timeout=0.5):  # raises if a child raised
        if time.monotonic() - start > 120:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, y = _data(16)
    for name in sorted(OURS):
        assert all(torch.equal(p, q) for p, q in zip(ranks[0][name], ranks[1][name])), name
        net = _Net()
        _steps(net, OURS[name](net.parameters()), x, y)
        _close([ranks[0][name]], [[p.detach() for p in net.ps]])


@pytest.mark.parametrize(
    ("recipe", "override", "cls"),
    [("novograd_digits", None, NovoGrad), ("arsg_digits", None, ARSG),
     ("arsg_digits", "lightning_landscape.optim.RSG", RSG)],
)  # fmt: skip
def test_lightning_cli_instantiates_each(
    recipe: str, override: str | None, cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipes (and ``--optimizer`` by class path) build our optimizers with their args."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_landscape.cli import LandscapeCLI, recipe_path

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(recipe_path(recipe)), "--trainer.logger=false"]
    if override:
        args += [f"--optimizer={override}", "--optimizer.lr=0.05", "--optimizer.beta=0.9"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LandscapeCLI(LightningModule, LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, run=False, args=args)  # fmt: skip
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer) and type(opt) is cls
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in cli.model.parameters()}
    if override:
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["beta"]) == (0.05, 0.9)
    st = stability_of(opt, list(cli.model.parameters()))
    assert st is not None and math.isfinite(st.threshold) and st.threshold > 0
