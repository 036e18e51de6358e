"""One conformance check: a reference fit, a fit with every column attached, what must hold.

The columns are every measurement callback at its defaults plus the common options, all on
one Trainer (a fit per cell would cost ten times the CI time); each column is checked on its
own tags ``landscape/<name>/...``. Against the reference fit without callbacks:

- ``fit`` finishes;
- each column logged every quantity it must (at least once, on enough distinct steps), all
  ``landscape/*`` values are finite, and no column logged ``landscape/<name>/skipped``;
- the user's own logged values (``train_loss``, ...) are identical, step by step;
- no observer effect: every ``state_dict`` entry and every optimizer-state tensor is
  bit-identical (``torch.equal``).

:func:`failures` returns every violated check as one line (empty: the row passes), so a failing
row says everything that is wrong with it at once. The DDP row (``ddp_pipeline.py``) runs the
same checks on each rank.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from lightning_landscape.callbacks import (
    GradientFlowDeviation,
    HessianEigenvalues,
    LossLandscape,
    SampleVarianceDecay,
    Sharpness,
)

from .models import Pipeline, loader

MAX_STEPS = (
    16  # 4 epochs of 4 batches (past settle_steps=10); windows of window=3 end at 3, 7, 11, 15
)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call (on every rank) in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append(
            (-1 if step is None else int(step), {k: float(v) for k, v in metrics.items()})
        )

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass(frozen=True)
class Column:
    """A callback configuration: its tag name and what it must log."""

    name: str
    make: Callable[[], Callback]
    required: tuple[str, ...]
    min_steps: int = 1  # distinct measured steps


COLUMNS: list[Column] = [
    # `ratio` of a preconditioned optimizer needs its state: not at step 0 for Adam
    Column("sharpness", lambda: Sharpness(), ("lambda_max", "threshold")),
    Column("hessian", lambda: HessianEigenvalues(), ("eig_1", "eig_5", "lambda_min")),
    Column("gradient_flow", lambda: GradientFlowDeviation(), ("step_gap",)),
    Column("sample_variance", lambda: SampleVarianceDecay(), ("last_over_first",)),
    Column("landscape", lambda: LossLandscape(), ("barrier",)),
    Column(
        "sharpness_every_2",
        lambda: Sharpness(every_n_steps=2, name="sharpness_every_2"),
        ("lambda_max", "threshold", "ratio"),
        min_steps=MAX_STEPS // 2,
    ),
    Column(
        "hessian_k3_trace",
        lambda: HessianEigenvalues(k=3, trace=True, every_n_steps=2, name="hessian_k3_trace"),
        ("eig_1", "eig_2", "eig_3", "lambda_min", "trace"),
        min_steps=MAX_STEPS // 2,
    ),
    Column(
        "gradient_flow_window",
        lambda: GradientFlowDeviation(
            window=3, window_every_n_steps=4, name="gradient_flow_window"
        ),
        ("deviation", "window_steps"),  # step_gap: at the budget cadence, as the default's
    ),
]


@dataclass
class FitResult:
    records: list[tuple[int, dict[str, float]]]
    state: dict[str, torch.Tensor]
    optimizer: list[dict[str, Any]]
    world_size: int = 1
    global_rank: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def _optimizer_state(trainer: pl.Trainer) -> list[dict[str, Any]]:
    out = []
    for opt in trainer.optimizers:
        sd = opt.state_dict()
        out.append(
            {
                "state": {
                    (i, k): v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for i, s in sd["state"].items()
                    for k, v in s.items()
                },
                "groups": [
                    {k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]
                ],
            }
        )
    return out


def _describe(err: BaseException) -> str:
    """The exception, where it left the package, and where it was raised."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "lightning_landscape" in f.filename]
    where = [*ours[-1:], *frames[-1:]]
    text = "".join(traceback.format_exception_only(type(err), err)).strip()
    return text + "".join(f"\n    at {f.filename}:{f.lineno} ({f.name})" for f in where)


def fit(
    pipeline: Pipeline,
    callbacks: list[Callback],
    root: str,
    *,
    max_steps: int = MAX_STEPS,
    **trainer_kwargs: Any,
) -> FitResult:
    """Fit ``pipeline`` from seed 0; an exception in ``fit`` is recorded, not raised."""
    pl.seed_everything(0, verbose=False)
    module = pipeline.module()
    data = loader(pipeline.data())
    logger = MemoryLogger()
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(pipeline.trainer)
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, data)
        except Exception as err:
            error = _describe(err)
    return FitResult(
        records=logger.records,
        state={k: v.detach().clone() for k, v in module.state_dict().items()},
        optimizer=_optimizer_state(trainer),
        world_size=trainer.world_size,
        global_rank=trainer.global_rank,
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        error=error,
    )


def landscape_records(result: FitResult) -> dict[tuple[int, str], float]:
    return {
        (step, k): v
        for step, m in result.records
        for k, v in m.items()
        if k.startswith("landscape/")
    }


def user_records(result: FitResult) -> list[tuple[int, dict[str, float]]]:
    """What the user's own ``self.log`` calls (and Lightning) sent to the logger."""
    out = []
    for step, metrics in result.records:
        mine = {k: v for k, v in metrics.items() if not k.startswith("landscape/")}
        if mine:
            out.append((step, mine))
    return out


def _label(column: Column) -> str:
    """How the callback of ``column`` names itself in its warnings: ``Sharpness`` or
    ``Sharpness(name='sharpness_every_2')``."""
    cb = column.make()
    cls, family = type(cb).__name__, getattr(type(cb), "family", None)
    return cls if column.name == family else f"{cls}(name={column.name!r})"


def _warnings_of(result: FitResult, column: Column | None = None) -> str:
    """The fit's warnings from ``column``'s callback (any measurement callback's: ``None``)."""
    if column is None:
        keys = ["Sharpness", "Hessian", "GradientFlow", "SampleVariance", "LossLandscape"]
    else:
        keys = [f"{_label(column)}:"]
    hits = sorted({w for w in result.warnings if any(k in w for k in keys)})
    return ("; warnings: " + " | ".join(h[:300] for h in hits)) if hits else ""


def failures(ref: FitResult, got: FitResult, columns: list[Column] = COLUMNS) -> list[str]:
    """Every violated conformance check of ``got`` (callbacks attached) against ``ref``."""
    if ref.error is not None:
        raise AssertionError(f"the reference fit without callbacks failed: {ref.error}")
    if got.error is not None:
        return [f"fit raised {got.error}{_warnings_of(got)}"]
    out: list[str] = []
    logged = landscape_records(got)
    bad = sorted({k for (_, k), v in logged.items() if not math.isfinite(v)})
    if bad:
        out.append(f"non-finite values logged: {bad}")
    names = {c.name for c in columns}
    stray = sorted({k for _, k in logged if k.split("/")[1] not in names})
    if stray:
        out.append(f"tags under no column's name: {stray}")
    for col in columns:
        prefix = f"landscape/{col.name}/"
        mine = {(s, k[len(prefix) :]): v for (s, k), v in logged.items() if k.startswith(prefix)}
        quantities = {q for _, q in mine}
        if "skipped" in quantities:
            count = max(v for (_, q), v in mine.items() if q == "skipped")
            out.append(f"{col.name}: skipped {count:g} measurement(s){_warnings_of(got, col)}")
        if not mine:
            out.append(f"{col.name}: logged nothing{_warnings_of(got, col)}")
        if quantities <= {"skipped"}:
            continue
        missing = [q for q in col.required if q not in quantities]
        if missing:
            out.append(
                f"{col.name}: never logged {missing} (logged {sorted(quantities)})"
                f"{_warnings_of(got, col)}"
            )
        steps = sorted({s for s, q in mine if q != "skipped"})
        if len(steps) < col.min_steps:
            out.append(f"{col.name}: measured at steps {steps}, expected >= {col.min_steps} steps")
    ref_user, got_user = user_records(ref), user_records(got)
    if ref_user != got_user:
        diff = next(
            ((a, b) for a, b in zip(ref_user, got_user) if a != b),
            (len(ref_user), len(got_user)),
        )
        out.append(f"the user's logged values changed (first difference without/with: {diff})")
    if set(ref.state) != set(got.state):
        out.append(f"state_dict keys changed: {sorted(set(ref.state) ^ set(got.state))}")
    changed = [
        k for k in ref.state if k in got.state and not torch.equal(ref.state[k], got.state[k])
    ]
    if changed:
        out.append(f"observer effect: state_dict entries differ: {changed}")
    if len(ref.optimizer) != len(got.optimizer):
        out.append("observer effect: a different number of optimizers")
    for i, (a, b) in enumerate(zip(ref.optimizer, got.optimizer)):
        if a["groups"] != b["groups"] or set(a["state"]) != set(b["state"]):
            out.append(f"observer effect: optimizer {i} hyper-parameters or state keys differ")
            continue
        diff_state = [
            k
            for k, v in a["state"].items()
            if not (
                torch.equal(v, b["state"][k]) if isinstance(v, torch.Tensor) else v == b["state"][k]
            )
        ]
        if diff_state:
            out.append(f"observer effect: optimizer {i} state differs at {diff_state[:5]}")
    return out


def make_columns(columns: list[Column] = COLUMNS) -> list[Callback]:
    return [c.make() for c in columns]
