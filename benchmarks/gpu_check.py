"""GPU check: the CUDA test subset, then GPU timings, in one prepared run of at most 8 minutes.

One command on a machine with one CUDA device (H100/H200 class)::

    PYTHONPATH=. python benchmarks/gpu_check.py            # -> benchmarks/gpu_results/

Parts, in this order, each under its own time cap (``--budget`` seconds overall, 440 by
default, shared in proportion to the nominal caps of the parts still to run, so time an early
part leaves unused goes to the later ones). Whatever a cap cuts is listed under ``"cut"`` in
the JSON and at the end of the Markdown; a part that raises is recorded with its error and the
next one runs.

0. ``pytest``: ``python -m pytest -m cuda tests/cuda`` in a subprocess (JUnit XML parsed:
   passed / failed / skipped, the failures' names and messages).
1. ``lambda_max``: on a ResNet-18 (CIFAR layout, 11.2M parameters, 32x32 inputs, BatchNorm)
   and a GPT-style LM (6 blocks, width 512, SDPA attention, ~21M parameters), each trained
   with its own optimizer (SGD + momentum / AdamW) on synthetic data on the device. From
   step ``pretrain`` on, every ``every`` steps λ_max of the probe loss is measured by
   ``ours-warm`` (``top_eigen(ProbeHessian(...), k=1, tol=1e-3)`` warm-started from the
   previous measurement: the callbacks' steady state; the first point is cold and left out
   of the medians), ``lanczos20`` (our Lanczos, cold, exactly 20 products) and, when
   ``pyhessian`` is importable, ``pyhessian`` (its power iteration, ``tol=1e-3``). The anchor
   is PyHessian if present, else ``lanczos20``. Error: against a longer fp32 solve
   warm-started from ours (``tol=1e-5``, at most 30 products) at the same point. Times are
   CUDA-synchronised; "training steps" divide by the median training step (forward,
   backward, update) of the same loop.
2. ``hvp``: one probe HVP / one probe gradient (``reuse_graph=True``: first, marginal and
   amortised over 5 products; ``reuse_graph=False``), median over repeats in rotating order.
3. ``memory``: ``torch.cuda.max_memory_allocated`` above what was allocated before (model,
   optimizer state, data, probe), for a 3-product λ_max solve inside the measurement guard
   (its parameter snapshot included) with ``ProbeHessian(..., reuse_graph=True)`` and
   ``=False``.
4. ``overhead``: Lightning ``fit`` of the same model and data with and without
   ``Sharpness()`` + ``HessianEigenvalues()`` at their defaults (the GPT's probe is 256
   sequences in batches of 64: the default 1024 x 128 tokens would hold ~80 GB of graphs), in
   one process, synchronised wall times: the whole fit, the step-0 measurement, and the loop
   after it. The default cadence charges the step-0 (cold) measurement to each callback's
   2.5 % budget, so a run shorter than ~40x that cost measures only once: the fit ratio then
   shows the cost of one cold measurement, the loop ratio the per-step cost of the hooks.
5. ``optimizers``: ``optimizer.step()`` alone on the models' real parameter lists with fixed
   gradients (foreach paths; fused Adam too on CUDA): NovoGrad, ARSG, RSG vs Adam/AdamW/SGD;
   K-FAC's extra time per training step (its hooks on factor-update steps + ``pre.step()``,
   against forward + backward without K-FAC) at its default cadence (10, 100), split into
   plain / factor-update / inverse-update steps, and amortised.

Output: ``<out>/gpu_check.json`` (machine, arguments, every sample, ``parts``, ``cut``) and
``<out>/gpu_check.md`` (one table per part), rewritten after every part so a run killed early
still leaves what it measured. ``--dry-run`` runs everything on the CPU with tiny models and a
few iterations (the pytest part only collects one module, ``-k`` deselecting everything) in
about 15 s on one thread: its numbers mean nothing; it exists so CI can run this script
(tests/test_gpu_check.py). ``--dry-run --device cuda`` is a quick smoke test on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script without an editable install
    sys.path.insert(0, str(ROOT))

from lightning_landscape.measures.eigen import EigenEstimate, top_eigen  # noqa: E402
from lightning_landscape.measures.guard import guard  # noqa: E402
from lightning_landscape.measures.operators import ProbeHessian  # noqa: E402
from lightning_landscape.measures.probe import Probe  # noqa: E402

try:  # the math backend has a double backward; the fused kernels do not
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]

PART_NAMES = ("pytest", "lambda_max", "hvp", "memory", "overhead", "optimizers")

# --------------------------------------------------------------------------- configurations
FULL: dict[str, Any] = {
    "budget": 440.0,  # + imports and CUDA start-up before the clock starts: under 8 minutes
    # seconds per part (the two models share a part's cap); they sum to 415 s + start-up
    "caps": {"pytest": 140, "lambda_max": 95, "hvp": 25, "memory": 20, "overhead": 85,
             "optimizers": 50},
    "cnn": {"width": 64, "blocks": (2, 2, 2, 2), "image": 32, "classes": 10, "samples": 8192,
            "batch": 128, "probe": 1024, "probe_batch": 256, "lr": 0.05},
    "gpt": {"vocab": 2048, "ctx": 128, "width": 512, "layers": 6, "heads": 8, "samples": 4096,
            "batch": 32, "probe": 256, "probe_batch": 64, "lr": 3e-4},
    "pretrain": 50, "every": 10, "points": 5, "ref_iter": 30, "pyhessian_iter": 100,
    "hvp_repeats": 3, "memory_products": 3,
    "overhead_seconds": 6.0, "overhead_min_steps": 100, "overhead_max_steps": 3000,
    "optim_warmup": 3, "optim_repeats": 20, "kfac_steps": 25, "kfac_inverse_steps": 2,
}  # fmt: skip
DRY: dict[str, Any] = {
    # generous caps: a dry run is a smoke test of the code paths, never cut on a busy machine
    "budget": 300.0,
    "caps": {"pytest": 60, "lambda_max": 60, "hvp": 30, "memory": 30, "overhead": 60,
             "optimizers": 40},
    # three stages at 16x16: no conv layer sees an all-padding patch row (an exactly singular
    # K-FAC factor), whose float32 eigh on one CPU thread can return NaN
    "cnn": {"width": 4, "blocks": (1, 1, 1), "image": 16, "classes": 10, "samples": 96,
            "batch": 16, "probe": 16, "probe_batch": 8, "lr": 0.05},
    "gpt": {"vocab": 64, "ctx": 16, "width": 32, "layers": 2, "heads": 4, "samples": 96,
            "batch": 8, "probe": 16, "probe_batch": 8, "lr": 3e-3},
    "pretrain": 3, "every": 2, "points": 3, "ref_iter": 20, "pyhessian_iter": 10,
    "hvp_repeats": 1, "memory_products": 2,
    "overhead_seconds": 0.3, "overhead_min_steps": 4, "overhead_max_steps": 8,
    "optim_warmup": 1, "optim_repeats": 3, "kfac_steps": 12, "kfac_inverse_steps": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 in its CIFAR layout (3x3 stem, no max-pool): 11.2M parameters at width 64."""

    def __init__(
        self, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GPTBlock(nn.Module):
    """Pre-norm transformer block; attention by ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style causal LM (untied head): ~21M parameters at width 512, 6 blocks, vocab 2048."""

    def __init__(self, vocab: int, ctx: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(ctx, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lm_criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``criterion(model(x), y)`` for PyHessian."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass
class Workload:
    """A model, its data on the device, its probe, loss and training optimizer."""

    name: str
    net: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    probe: Probe
    probe_batch: int
    make_opt: Callable[[Any], torch.optim.Optimizer]
    opt_name: str
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))
    step_times: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    def batch_at(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_at(torch.randint(len(self.x), (self.batch,), generator=self.gen))


def make_cnn(cfg: dict[str, Any], device: torch.device) -> Workload:
    torch.manual_seed(0)
    net = ResNet(cfg["width"], tuple(cfg["blocks"]), cfg["classes"]).to(device)
    gen = torch.Generator().manual_seed(0)
    n, s = cfg["samples"], cfg["image"]
    x = torch.randn(n, 3, s, s, generator=gen)
    teacher = torch.randn(3 * s * s, cfg["classes"], generator=gen)  # a learnable linear task
    y = (x.flatten(1) @ teacher).argmax(1)
    x, y = x.to(device), y.to(device)
    probe = Probe.from_samples(
        (x[: cfg["probe"]], y[: cfg["probe"]]), batch_size=cfg["probe_batch"]
    )
    lr = cfg["lr"]
    return Workload(
        name=f"ResNet-18 (width {cfg['width']}, {s}x{s})",
        net=net, loss_fn=classification_loss, criterion=F.cross_entropy, x=x, y=y,
        batch=cfg["batch"], probe=probe, probe_batch=cfg["probe_batch"],
        make_opt=lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9), opt_name="SGD+momentum",
    )  # fmt: skip


def markov_tokens(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` sequences of a sparse first-order Markov chain (4 successors per token)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(vocab, (vocab, 4), generator=gen)
    seq = torch.empty(n, length, dtype=torch.int64)
    seq[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(1, length):
        seq[:, t] = table[seq[:, t - 1], torch.randint(4, (n,), generator=gen)]
    return seq


def make_gpt(cfg: dict[str, Any], device: torch.device) -> Workload:
    torch.manual_seed(0)
    net = GPT(cfg["vocab"], cfg["ctx"], cfg["width"], cfg["layers"], cfg["heads"]).to(device)
    seq = markov_tokens(cfg["samples"], cfg["ctx"] + 1, cfg["vocab"]).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    probe = Probe.from_samples(
        (x[: cfg["probe"]], y[: cfg["probe"]]), batch_size=cfg["probe_batch"]
    )
    lr = cfg["lr"]
    return Workload(
        name=f"GPT ({cfg['layers']}x{cfg['width']}, ctx {cfg['ctx']}, vocab {cfg['vocab']})",
        net=net, loss_fn=lm_loss, criterion=lm_criterion, x=x, y=y, batch=cfg["batch"],
        probe=probe, probe_batch=cfg["probe_batch"],
        make_opt=lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01), opt_name="AdamW",
    )  # fmt: skip


# --------------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple:
    """``(seconds, fn(*args, **kwargs))``, synchronised with the device on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


@contextlib.contextmanager
def measuring(model: nn.Module, seed: int) -> Iterator[None]:
    """The callbacks' measurement mode: the guard (eval mode, restored state) + math SDPA."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(guard(model, seed=seed))
        if sdpa_kernel is not None:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


def train(
    w: Workload, opt: torch.optim.Optimizer, steps: int, device: torch.device,
    until: float | None = None,
) -> int:  # fmt: skip
    """``steps`` training steps, each timed (synchronised) into ``w.step_times``; with ``until``
    (a ``time.perf_counter()`` value) it stops there. Returns the steps taken."""
    w.net.train()
    for k in range(steps):
        if until is not None and time.perf_counter() >= until:
            return k
        batch = w.sample()
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        w.loss_fn(w.net, batch).backward()
        opt.step()
        sync(device)
        w.step_times.append(time.perf_counter() - start)
        w.steps += 1
    return steps


class Deadline:
    """A part's (or a model's) time cap; what it cuts is recorded in ``cuts``."""

    def __init__(self, seconds: float, cuts: list[str], label: str) -> None:
        self.end = time.perf_counter() + max(seconds, 0.0)
        self.cuts = cuts
        self.label = label

    def left(self) -> float:
        return self.end - time.perf_counter()

    def ok(self, estimate: float) -> bool:
        return self.left() >= estimate

    def cut(self, what: str) -> None:
        self.cuts.append(f"{self.label}: {what}")


# --------------------------------------------------------------------------- machine
def machine(device: torch.device) -> dict[str, Any]:
    import lightning

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
        "git": git_state(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        from importlib.metadata import version

        info["pyhessian"] = version("pyhessian")
    except Exception:  # noqa: BLE001
        info["pyhessian"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_landscape"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- 0. pytest
def part_pytest(args: argparse.Namespace, cap: float, out_dir: Path) -> dict[str, Any]:
    xml = out_dir / "pytest_cuda.xml"
    out_dir.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)  # never report a previous run's results
    # the dry run only collects one light module (every test deselected by -k): it exercises
    # the subprocess and JUnit path; the default CPU test run imports every module anyway
    target = "tests/cuda/test_optimizers_cuda.py" if args.dry_run else "tests/cuda"
    cmd = [sys.executable, "-m", "pytest", target, "-m", "cuda", "-q", "-rfEs",
           "-p", "no:cacheprovider", f"--junitxml={xml}"]  # fmt: skip
    if args.dry_run:
        cmd += ["-k", "not_a_test_name_dry_run"]
    with contextlib.suppress(ImportError):
        import pytest_timeout  # noqa: F401

        cmd += [f"--timeout={int(min(60, max(cap - 5, 10)))}"]  # one hung test only
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(cap, 1.0)
        )
        rc: int | None = proc.returncode
        tail = (proc.stdout + proc.stderr)[-4000:]
        # 0: all passed; 5: nothing collected (the dry run deselects everything); 1: failures
        status = "ok" if rc == 0 or (args.dry_run and rc == 5) else "failed" if rc == 1 else "error"
    except subprocess.TimeoutExpired as err:
        rc, status = None, "cut"
        tail = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                else (err.stdout or ""))[-4000:]  # fmt: skip
    result: dict[str, Any] = {
        "status": status,
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "seconds": time.perf_counter() - start,
        "output_tail": tail,
    }
    if args.dry_run:
        result["note"] = "dry run: one module collected, every test deselected by -k"
    if xml.exists():
        result.update(parse_junit(xml))
    return result


def parse_junit(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[dict[str, str]] = []
    skipped: list[str] = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                bad = case.find(tag)
                if bad is not None:
                    failed.append(
                        {"test": name, "kind": tag, "message": (bad.get("message") or "")[:500]}
                    )
            if case.find("skipped") is not None:
                skipped.append(name)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "failed": failed, "skipped_tests": skipped[:50]}


# --------------------------------------------------------------------------- 1. λ_max
def _pyhessian(w: Workload, seed: int, device: torch.device, max_iter: int) -> tuple[float, int]:
    """PyHessian's power iteration (``tol=1e-3``): ``(value, HVPs)``; leaves the CPU RNG."""
    from pyhessian import hessian

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h = hessian(w.net, w.criterion, dataloader=w.probe.batches, cuda=device.type == "cuda")
        calls = [0]
        product = h.dataloader_hv_product

        def counted(v: list[torch.Tensor]) -> Any:
            calls[0] += 1
            return product(v)

        h.dataloader_hv_product = counted
        values, _ = h.eigenvalues(maxIter=max_iter, tol=1e-3, top_n=1)
    w.net.zero_grad(set_to_none=True)
    return float(values[0]), calls[0]


def _solve(w: Workload, **kwargs: Any) -> EigenEstimate:
    """One λ_max solve on a fresh operator (its cached graphs are dropped on return)."""
    op = ProbeHessian(w.net, w.probe, w.loss_fn)
    try:
        return top_eigen(op, k=1, **kwargs)
    finally:
        op.release()


def lambda_model(
    w: Workload, opt: torch.optim.Optimizer, cfg: dict[str, Any], dl: Deadline, device: torch.device
) -> dict[str, Any]:
    try:
        import pyhessian  # noqa: F401

        have_pyhessian = True
    except ImportError:
        have_pyhessian = False
    methods = ["ours-warm", "lanczos20"] + (["pyhessian"] if have_pyhessian else [])
    anchor = "pyhessian" if have_pyhessian else "lanczos20"
    pyhessian_error = None
    done = train(w, opt, cfg["pretrain"], device, until=time.perf_counter() + 0.2 * dl.left())
    if done < cfg["pretrain"]:
        dl.cut(f"{w.name}: pre-training after {done} of {cfg['pretrain']} steps")
    points: list[dict[str, Any]] = []
    prev: EigenEstimate | None = None
    last_cost = 0.0
    for i in range(cfg["points"]):
        if i > 0:
            if not dl.ok(last_cost):
                dl.cut(f"{w.name}: {cfg['points'] - i} of {cfg['points']} measurement points")
                break
            train(w, opt, cfg["every"], device)
        start = time.perf_counter()
        row: dict[str, Any] = {"step": w.steps}
        current: EigenEstimate | None = None
        with measuring(w.net, seed=i):
            for method in rotate(methods, i):
                if method == "ours-warm":
                    warm = None if prev is None else prev.warm_start()
                    sec, est = clock(
                        device, _solve, w, max_iter=20, tol=1e-3, warm_start=warm, seed=i
                    )
                    current = est
                    row[method] = {"value": est.lambda_max, "hvps": est.matvecs, "seconds": sec,
                                   "residual": float(est.residuals[0])}  # fmt: skip
                elif method == "lanczos20":
                    sec, est = clock(device, _solve, w, max_iter=20, min_iter=20, tol=0.0, seed=i)
                    row[method] = {"value": est.lambda_max, "hvps": est.matvecs, "seconds": sec,
                                   "residual": float(est.residuals[0])}  # fmt: skip
                else:
                    try:
                        sec, (value, hvps) = clock(
                            device, _pyhessian, w, i, device, cfg["pyhessian_iter"]
                        )
                        row[method] = {"value": value, "hvps": hvps, "seconds": sec}
                    except Exception as err:  # noqa: BLE001  (an optional anchor; ours go on)
                        pyhessian_error = f"{type(err).__name__}: {str(err)[:300]}"
                        print(
                            f"  [{w.name}] PyHessian failed ({pyhessian_error}); anchor: lanczos20"
                        )
                        methods.remove("pyhessian")
                        anchor = "lanczos20"
                        for p in points:
                            p.pop("pyhessian", None)
            assert current is not None
            ref = _solve(
                w, max_iter=cfg["ref_iter"], tol=1e-5, warm_start=current.warm_start(), seed=i
            )
        row["ref"] = {
            "value": ref.lambda_max,
            "hvps": ref.matvecs,
            "residual": float(ref.residuals[0]),
        }
        for method in methods:
            row[method]["error"] = abs(row[method]["value"] - ref.lambda_max) / max(
                abs(ref.lambda_max), 1e-30
            )
        prev = current
        points.append(row)
        last_cost = (time.perf_counter() - start) + cfg["every"] * median(w.step_times)
        print(f"  [{w.name}] step {row['step']}: ref {ref.lambda_max:.5g} | " + " | ".join(
            f"{m} {row[m]['value']:.5g} ({row[m]['hvps']} HVP, {1e3 * row[m]['seconds']:.0f} ms)"
            for m in methods), flush=True)  # fmt: skip
    steady = points[1:] if len(points) > 1 else points
    step = median(w.step_times)
    summary = {}
    for method in methods:
        secs = [p[method]["seconds"] for p in steady]
        summary[method] = {
            "hvps_median": median([p[method]["hvps"] for p in steady]),
            "ms_median": 1e3 * median(secs),
            "train_steps": median(secs) / step,
            "err_median": median([p[method]["error"] for p in steady]),
            "err_max": max((p[method]["error"] for p in steady), default=math.nan),
            "anchor_over_this": median([p[anchor]["seconds"] / p[method]["seconds"] for p in steady]),
        }  # fmt: skip
    return {
        "model": w.name, "params": w.params, "optimizer": w.opt_name,
        "train_step_ms": 1e3 * step, "anchor": anchor, "methods": methods,
        "steady_points": len(points) - 1, "points": points, "summary": summary,
        "pyhessian_error": pyhessian_error,
    }  # fmt: skip


# --------------------------------------------------------------------------- 2. HVP / gradient
HVP_COLUMNS = ("gradient", "reuse_first", "reuse_marginal", "reuse_amortised", "no_reuse")


def _hvp_repeat(w: Workload, v: torch.Tensor, rot: int, device: torch.device) -> dict[str, float]:
    out: dict[str, float] = {}

    def gradient() -> None:
        op = ProbeHessian(w.net, w.probe, w.loss_fn)
        out["gradient"] = clock(device, op.loss_and_gradient)[0]

    def reuse() -> None:
        op = ProbeHessian(w.net, w.probe, w.loss_fn, reuse_graph=True)
        times = [clock(device, op.matvec, v)[0] for _ in range(5)]
        op.release()
        out["reuse_first"] = times[0]
        out["reuse_marginal"] = median(times[1:])
        out["reuse_amortised"] = sum(times) / len(times)

    def no_reuse() -> None:
        op = ProbeHessian(w.net, w.probe, w.loss_fn, reuse_graph=False)
        out["no_reuse"] = median([clock(device, op.matvec, v)[0] for _ in range(3)])

    for part in rotate([gradient, reuse, no_reuse], rot):
        part()
    return out


def hvp_model(w: Workload, cfg: dict[str, Any], dl: Deadline, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(w.params, generator=gen).to(device)
    v /= v.norm()
    reps: list[dict[str, float]] = []
    with measuring(w.net, seed=0):
        start = time.perf_counter()
        _hvp_repeat(w, v, 0, device)  # warm-up (allocator, kernels), discarded
        cost = time.perf_counter() - start
        for r in range(cfg["hvp_repeats"]):
            if not dl.ok(cost):
                dl.cut(f"{w.name}: {cfg['hvp_repeats'] - r} of {cfg['hvp_repeats']} repeats")
                break
            reps.append(_hvp_repeat(w, v, r, device))
    if not reps:
        return {"model": w.name, "params": w.params, "status": "cut"}
    ratios = {c: median([r[c] / r["gradient"] for r in reps]) for c in HVP_COLUMNS}
    ms = {c: 1e3 * median([r[c] for r in reps]) for c in HVP_COLUMNS}
    print(
        f"  [{w.name}] "
        + " | ".join(f"{c} {ms[c]:.1f} ms ({ratios[c]:.2f}x)" for c in HVP_COLUMNS),
        flush=True,
    )
    return {"model": w.name, "params": w.params, "ms": ms, "ratios": ratios, "repeats": reps}


# --------------------------------------------------------------------------- 3. memory
def memory_model(w: Workload, cfg: dict[str, Any], dl: Deadline, device: torch.device) -> dict:
    rows: dict[str, Any] = {}
    cuda = device.type == "cuda"
    for reuse in (True, False):
        if rows and not dl.ok(2 * rows["reuse_graph=True"]["seconds"]):
            dl.cut(f"{w.name}: reuse_graph=False")
            break
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else None
        with measuring(w.net, seed=0):
            op = ProbeHessian(w.net, w.probe, w.loss_fn, reuse_graph=reuse)
            n = cfg["memory_products"]
            sec, est = clock(device, top_eigen, op, k=1, max_iter=n, min_iter=n, tol=0.0)
            op.release()
            del op
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        rows[f"reuse_graph={reuse}"] = {
            "seconds": sec,
            "products": est.matvecs,
            "allocated_before_mib": None if base is None else base / 2**20,
            "peak_above_mib": None if peak is None else (peak - base) / 2**20,
        }
    note = None if cuda else "no CUDA: peak memory not measured (times only)"
    ratio = None
    if cuda and len(rows) == 2:
        ratio = rows["reuse_graph=True"]["peak_above_mib"] / max(
            rows["reuse_graph=False"]["peak_above_mib"], 1e-9
        )
    print(f"  [{w.name}] " + " | ".join(
        f"{k}: peak +{v['peak_above_mib'] or 0:.0f} MiB, {1e3 * v['seconds']:.0f} ms" for k, v in rows.items()
    ), flush=True)  # fmt: skip
    return {"model": w.name, "params": w.params, "probe_samples": w.probe.num_samples,
            "probe_batch": w.probe_batch, "rows": rows, "reuse_over_no_reuse": ratio,
            "note": note}  # fmt: skip


# --------------------------------------------------------------------------- 4. overhead
def overhead_model(
    w: Workload, cfg: dict[str, Any], dl: Deadline, device: torch.device, step_s: float,
    hvp_s: float, is_gpt: bool,
) -> dict[str, Any]:  # fmt: skip
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    from lightning_landscape.callbacks import HessianEigenvalues, Sharpness

    class Counting(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.steps: dict[str, set[int]] = {}

        @property
        def name(self) -> str:
            return "counting"

        @property
        def version(self) -> str:
            return "0"

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            for key in metrics:
                if key.startswith("landscape/"):
                    family = key.split("/")[1]
                    self.steps.setdefault(family, set()).add(int(step or 0))

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    class Mark(pl.Callback):
        """Synchronised time stamps at train start (before/after the measurement callbacks)."""

        def __init__(self, stamps: dict[str, float], key: str, end: bool = False) -> None:
            self.stamps, self.key, self.end = stamps, key, end

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.stamps[self.key] = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.end:
                sync(device)
                self.stamps["end"] = time.perf_counter()

    loss_fn, make_opt = w.loss_fn, w.make_opt

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.net, batch)

        def landscape_loss(self, batch: Any) -> torch.Tensor:
            # the measurement guard selects the math SDPA backend too; this keeps the timing
            # independent of that (tests/cuda/test_sdpa_cuda.py checks the guard itself)
            with contextlib.ExitStack() as stack:
                if sdpa_kernel is not None:
                    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                return loss_fn(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_opt(self.parameters())

    probe_kw: dict[str, Any] = {}
    if is_gpt:
        probe_kw = {"probe_size": w.probe.num_samples, "probe_batch_size": w.probe_batch}
    steps = int(cfg["overhead_seconds"] / max(step_s, 1e-6))
    steps = max(cfg["overhead_min_steps"], min(cfg["overhead_max_steps"], steps))
    init = copy.deepcopy(w.net.state_dict())

    def fit(with_callbacks: bool, max_steps: int) -> dict[str, Any]:
        net = copy.deepcopy(w.net)
        net.load_state_dict(init)
        stamps: dict[str, float] = {}
        cbs: list[Any] = (
            [Sharpness(**probe_kw), HessianEigenvalues(**probe_kw)] if with_callbacks else []
        )
        logger = Counting()
        data = TensorDataset(w.x, w.y)
        sampler = BatchSampler(
            RandomSampler(data, generator=torch.Generator().manual_seed(0)), w.batch, drop_last=True
        )
        loader = DataLoader(data, sampler=sampler, batch_size=None)
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=max_steps,
            max_epochs=-1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, precision="32-true",
            callbacks=[Mark(stamps, "start"), *cbs, Mark(stamps, "loop", end=True)],
        )  # fmt: skip
        pl.seed_everything(0, verbose=False)
        seconds, _ = clock(device, trainer.fit, Module(net), loader)
        return {
            "with_callbacks": with_callbacks,
            "steps": trainer.global_step,
            "fit_seconds": seconds,
            "step0_seconds": stamps["loop"] - stamps["start"],
            "loop_seconds": stamps["end"] - stamps["loop"],
            "callbacks": [{"name": type(cb).__name__, "own_seconds": cb.seconds,
                           "measured_steps": sorted(logger.steps.get(cb.family, set()))}
                          for cb in cbs],
        }  # fmt: skip

    # warm-up (Lightning's first fit, cuDNN plans), discarded; then pairs in alternating order
    # while time allows (estimate of one fit: steps x step + a 40-HVP cold solve + set-up)
    fit(False, 2)
    estimate = steps * step_s * 1.3 + 40 * hvp_s + 3.0
    runs: list[dict[str, Any]] = []
    for flag in (False, True, True, False):
        if not dl.ok(estimate):
            dl.cut(f"{w.name}: fits {len(runs) + 1}-4 of 4 (with/without pairs)")
            break
        runs.append(fit(flag, steps))
        r = runs[-1]
        print(f"  [{w.name}] callbacks={flag}: fit {r['fit_seconds']:.2f} s, step 0 "
              f"{r['step0_seconds']:.2f} s, loop {r['loop_seconds']:.2f} s, {r['steps']} steps",
              flush=True)  # fmt: skip
    pairs = [(a, b) for a, b in zip(runs[0::2], runs[1::2])]
    pairs = [(a, b) if not a["with_callbacks"] else (b, a) for a, b in pairs]
    out: dict[str, Any] = {"model": w.name, "params": w.params, "optimizer": w.opt_name,
                           "steps": steps, "callback_kwargs": probe_kw, "runs": runs}  # fmt: skip
    if pairs:
        out["fit_ratio"] = median([b["fit_seconds"] / a["fit_seconds"] for a, b in pairs])
        out["loop_ratio"] = median([b["loop_seconds"] / a["loop_seconds"] for a, b in pairs])
        withs = [b for _, b in pairs]
        out["step0_seconds"] = median([b["step0_seconds"] for b in withs])
        out["own_share"] = median(
            [sum(c["own_seconds"] for c in b["callbacks"]) / b["fit_seconds"] for b in withs]
        )
        out["measurements"] = {c["name"]: len(c["measured_steps"]) for c in withs[0]["callbacks"]}
    return out


# --------------------------------------------------------------------------- 5. optimizers
def optimizer_table(
    cuda: bool,
) -> dict[str, tuple[Callable[[list[Any]], torch.optim.Optimizer], str | None]]:
    from lightning_landscape.optim import ARSG, RSG, NovoGrad

    table: dict[str, tuple[Callable[[list[Any]], torch.optim.Optimizer], str | None]] = {
        "SGD+momentum (foreach)": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True), None),
        "Adam (foreach)": (lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), None),
        "AdamW (foreach)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-3, foreach=True), None),
        "NovoGrad (foreach)": (lambda ps: NovoGrad(ps, weight_decay=1e-3, foreach=True), "AdamW (foreach)"),
        "NovoGrad (single)": (lambda ps: NovoGrad(ps, weight_decay=1e-3, foreach=False), "AdamW (foreach)"),
        "ARSG (foreach)": (lambda ps: ARSG(ps, foreach=True), "Adam (foreach)"),
        "ARSG Adam mode (foreach)": (lambda ps: ARSG(ps, amsgrad=False, foreach=True), "Adam (foreach)"),
        "ARSG (single)": (lambda ps: ARSG(ps, foreach=False), "Adam (foreach)"),
        "RSG (foreach)": (lambda ps: RSG(ps, lr=1e-3, foreach=True), "SGD+momentum (foreach)"),
    }  # fmt: skip
    if cuda:
        table["Adam (fused)"] = (
            lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
            "Adam (foreach)",
        )
    return table


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def optim_model(w: Workload, cfg: dict[str, Any], dl: Deadline, device: torch.device) -> dict:
    from lightning_landscape.optim import KFACPreconditioner

    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    base = [p.detach().clone() for p in w.net.parameters()]
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in base]
    table = optimizer_table(cuda)
    runs: dict[str, Any] = {}
    for name, (factory, _) in table.items():
        params = [nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        runs[name] = {"params": params, "opt": factory(params), "samples": []}
    names = list(table)
    total = cfg["optim_warmup"] + cfg["optim_repeats"]
    first_order = Deadline(0.4 * dl.left(), dl.cuts, dl.label)  # the rest is K-FAC's
    cost = 0.0
    for rep in range(total):
        if rep > cfg["optim_warmup"] and not first_order.ok(cost):
            first_order.cut(
                f"{w.name}: optimizer repeats {rep - cfg['optim_warmup']}+ of {cfg['optim_repeats']}"
            )
            break
        start = time.perf_counter()
        for name in rotate(names, rep):
            run = runs[name]
            sec, _ = clock(device, run["opt"].step)
            if rep >= cfg["optim_warmup"]:
                run["samples"].append(sec)
        cost = time.perf_counter() - start
    rows: dict[str, Any] = {}
    adam_bytes = max(_state_bytes(runs["Adam (foreach)"]["opt"]), 1)
    for name, (_, anchor) in table.items():
        samples = runs[name]["samples"]
        rows[name] = {"anchor": anchor, "ms_median": 1e3 * median(samples), "samples_s": samples,
                      "state_vs_adam": _state_bytes(runs[name]["opt"]) / adam_bytes}  # fmt: skip
    for row in rows.values():
        if row["anchor"] is not None:
            row["vs_anchor"] = row["ms_median"] / rows[row["anchor"]]["ms_median"]
    del runs
    kfac = kfac_timing(w, cfg, dl, device, KFACPreconditioner)
    sgd_ms = rows["SGD+momentum (foreach)"]["ms_median"]
    if kfac.get("amortised_ms") is not None:
        kfac["amortised_plus_sgd_vs_sgd"] = (kfac["amortised_ms"] + sgd_ms) / sgd_ms
        step_ms = kfac["fwd_bwd_ms"] + sgd_ms  # a plain training step (forward, backward, SGD)
        kfac["training_step_ratio"] = (step_ms + kfac["amortised_ms"]) / step_ms
    print(f"  [{w.name}] " + " | ".join(f"{n} {r['ms_median']:.2f} ms" for n, r in rows.items())
          + f" | K-FAC amortised {_f(kfac.get('amortised_ms'))} ms", flush=True)  # fmt: skip
    return {"model": w.name, "params": w.params, "tensors": len(base), "rows": rows, "kfac": kfac}


def kfac_timing(
    w: Workload, cfg: dict[str, Any], dl: Deadline, device: torch.device, kfac_cls: Any
) -> dict[str, Any]:
    """K-FAC's extra time per training step at its default cadence (10, 100), by kind of step.

    A factor-update step records statistics in the layers' hooks during forward and backward,
    so a step's K-FAC cost is ``(forward + backward + pre.step()) − forward + backward without
    K-FAC`` (same model, same batches), classified by what ``pre.info`` says the step did.
    """

    def run(cadence: tuple[int, int] | None, steps: int) -> dict[str, list[float]]:
        net = copy.deepcopy(w.net)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        pre = None
        if cadence is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pre = kfac_cls(net, optimizer=opt, damping=0.1, factor_update_every=cadence[0],
                               inverse_update_every=cadence[1])  # fmt: skip
        kinds: dict[str, list[float]] = {"plain": [], "factors": [], "inverses": [], "pre_step": []}
        gen = torch.Generator().manual_seed(2)
        for _ in range(steps):
            longest = max([max(v, default=0.0) for v in kinds.values()])
            if not dl.ok(1.5 * longest):
                dl.cut(f"{w.name}: K-FAC {cadence} after {sum(map(len, kinds.values()))} steps")
                break
            batch = w.batch_at(torch.randint(len(w.x), (w.batch,), generator=gen))
            opt.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            w.loss_fn(net, batch).backward()
            sync(device)
            middle = time.perf_counter()
            kind = "plain"
            if pre is not None:
                pre.step()
                sync(device)
                info = pre.info
                kind = "inverses" if info.inverses_updated else "factors" if info.factors_updated else "plain"  # fmt: skip
                kinds["pre_step"].append(time.perf_counter() - middle)
            kinds[kind].append(time.perf_counter() - start)
            opt.step()
        if pre is not None:
            skipped[str(cadence)] = pre.skipped_steps  # non-finite gradients: K-FAC diverged
        return kinds

    skipped: dict[str, int] = {}

    base = run(None, cfg["kfac_steps"])["plain"]  # forward + backward without K-FAC
    default = run((10, 100), cfg["kfac_steps"])
    every = run((1, 1), cfg["kfac_inverse_steps"] + 1)  # each step: factors + eigendecompositions
    fwd_bwd = median(base[1:] or base)
    plain = median(default["plain"]) - fwd_bwd
    factors = median(default["factors"]) - fwd_bwd
    inverses = median(every["inverses"][1:] or every["inverses"] or default["inverses"]) - fwd_bwd
    amortised = None
    if all(math.isfinite(x) for x in (plain, factors, inverses)):
        # at (10, 100): 90 plain, 9 factor-update and 1 factor+inverse-update step per 100
        amortised = 1e3 * (0.9 * plain + 0.09 * factors + 0.01 * inverses)
    return {
        "cadence": [10, 100],
        "plain_ms": 1e3 * plain, "factor_update_ms": 1e3 * factors,
        "inverse_update_ms": 1e3 * inverses, "amortised_ms": amortised,
        "fwd_bwd_ms": 1e3 * fwd_bwd, "skipped_steps": skipped,
        "samples_s": {"without_kfac": base, "default": default, "every_step": every},
    }  # fmt: skip


# --------------------------------------------------------------------------- Markdown
def _f(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# GPU check" + (" (dry run: numbers mean nothing)" if payload["dry_run"] else ""),
        "",
        f"{m['date']} | {m.get('gpu', m['device'])} | torch {m['torch']} (CUDA {m['cuda_runtime']}), "
        f"lightning {m['lightning']}, pyhessian {m['pyhessian']} | TF32 matmul {m['tf32_matmul']}, "
        f"cuDNN {m['tf32_cudnn']} | git {m['git']} | total {payload.get('total_seconds', 0):.0f} s",
    ]  # fmt: skip
    parts = payload["parts"]

    def head(name: str, title: str) -> dict[str, Any] | None:
        part = parts.get(name)
        lines.extend(["", f"## {title}", ""])
        if part is None:
            lines.append("not run")
            return None
        lines.append(f"status: {part['status']}, {part.get('seconds', 0):.1f} s"
                     + (f" — error: `{part['error']}`" if part.get("error") else ""))  # fmt: skip
        lines.append("")
        return part

    part = head("pytest", "0. CUDA tests (`pytest -m cuda tests/cuda`)")
    if part is not None:
        lines.append(f"`{part.get('command', '')}` → return code {part.get('returncode')}")
        if "counts" in part:
            c = part["counts"]
            lines += ["", "| tests | passed | failed | errors | skipped |", "|---|---|---|---|---|",
                      f"| {c['tests']} | {c['passed']} | {c['failures']} | {c['errors']} | {c['skipped']} |"]  # fmt: skip
            for bad in part.get("failed", []):
                lines.append(f"- {bad['kind']}: `{bad['test']}`: {bad['message'][:200]}")
    part = head(
        "lambda_max", "1. λ_max: warm-started steady state vs the anchor vs cold Lanczos-20"
    )
    for r in (part or {}).get("models", []):
        lines += ["", f"**{r['model']}** ({r['params']:,} parameters, {r['optimizer']}; training step "
                  f"{r['train_step_ms']:.1f} ms; {r['steady_points']} steady-state points; anchor: "
                  f"{r['anchor']})", "",
                  "| method | HVPs (median) | ms (median) | training steps | anchor time / this "
                  "| rel. error (median / max) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for method, s in r["summary"].items():
            lines.append(
                f"| {method} | {_f(s['hvps_median'], 'g')} | {_f(s['ms_median'], '.1f')} | "
                f"{_f(s['train_steps'], '.1f')} | {_f(s['anchor_over_this'])}x | "
                f"{_f(s['err_median'], '.1e')} / {_f(s['err_max'], '.1e')} |"
            )
    part = head("hvp", "2. HVP time / gradient time (probe)")
    if part is not None and part.get("models"):
        lines += ["| model | params | gradient ms | reuse: first | reuse: marginal | "
                  "reuse: amortised (5) | reuse_graph=False |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in part["models"]:
            if "ms" not in r:
                lines.append(f"| {r['model']} | {r['params']:,} | cut | | | | |")
                continue
            cells = [f"{r['ms'][c]:.1f} ms ({r['ratios'][c]:.2f}x)" for c in HVP_COLUMNS[1:]]
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['ms']['gradient']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    part = head(
        "memory",
        f"3. Peak memory of a λ_max measurement ({payload['config']['memory_products']} products)",
    )
    if part is not None and part.get("models"):
        lines += ["| model | probe | allocated before (MiB) | reuse_graph=True: peak above (MiB) | "
                  "reuse_graph=False: peak above (MiB) | ratio | ms (True / False) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in part["models"]:
            t, f = r["rows"].get("reuse_graph=True", {}), r["rows"].get("reuse_graph=False", {})
            lines.append(
                f"| {r['model']} | {r['probe_samples']} in batches of {r['probe_batch']} | "
                f"{_f(t.get('allocated_before_mib'), '.0f')} | {_f(t.get('peak_above_mib'), '.0f')} | "
                f"{_f(f.get('peak_above_mib'), '.0f')} | {_f(r['reuse_over_no_reuse'])} | "
                f"{_f(1e3 * t['seconds'] if t else None, '.0f')} / {_f(1e3 * f['seconds'] if f else None, '.0f')} |"
            )  # fmt: skip
            if r.get("note"):
                lines.append(f"| | {r['note']} | | | | | |")
    part = head(
        "overhead", "4. Overhead of `Sharpness()` + `HessianEigenvalues()` (Lightning, defaults)"
    )
    if part is not None and part.get("models"):
        lines += ["| model | steps | fit without / with (s) | fit ratio | step-0 measurement (s) | "
                  "loop ratio (after step 0) | callbacks' own share | measurements |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in part["models"]:
            if "fit_ratio" not in r:
                lines.append(f"| {r['model']} | {r['steps']} | cut | | | | | |")
                continue
            base = median([x["fit_seconds"] for x in r["runs"] if not x["with_callbacks"]])
            withs = median([x["fit_seconds"] for x in r["runs"] if x["with_callbacks"]])
            meas = ", ".join(f"{k} {v}" for k, v in r["measurements"].items())
            lines.append(
                f"| {r['model']} | {r['steps']} | {base:.2f} / {withs:.2f} | {r['fit_ratio']:.3f} | "
                f"{r['step0_seconds']:.2f} | {r['loop_ratio']:.3f} | {100 * r['own_share']:.1f} % | {meas} |"
            )  # fmt: skip
        lines += ["", "The default cadence charges the cold step-0 measurement to each callback's "
                  "2.5 % budget: in a run shorter than ~40x its cost nothing else is measured, so the "
                  "fit ratio is one cold measurement over the run and the loop ratio the hooks' "
                  "per-step cost."]  # fmt: skip
    part = head("optimizers", "5. Optimizer step time (`step()` alone, fixed gradients)")
    for r in (part or {}).get("models", []):
        lines += ["", f"**{r['model']}** ({r['params']:,} parameters in {r['tensors']} tensors)", "",
                  "| optimizer | step ms (median) | vs anchor | state / Adam |", "|---|---|---|---|"]  # fmt: skip
        for name, row in r["rows"].items():
            vs = (
                "anchor"
                if row["anchor"] is None
                else f"{_f(row.get('vs_anchor'))} vs {row['anchor']}"
            )
            lines.append(
                f"| {name} | {_f(row['ms_median'], '.3f')} | {vs} | {_f(row['state_vs_adam'])} |"
            )
        k = r.get("kfac", {})
        if k:
            lines += [
                "",
                f"K-FAC at (10, 100), extra time per training step (hooks + `pre.step()`; SGD + momentum "
                f"underneath): plain step {_f(k.get('plain_ms'), '.2f')} ms, factor update "
                f"{_f(k.get('factor_update_ms'), '.1f')} ms, factor + inverse update "
                f"{_f(k.get('inverse_update_ms'), '.0f')} ms; amortised "
                f"{_f(k.get('amortised_ms'), '.2f')} ms (K-FAC + SGD step = {_f(k.get('amortised_plus_sgd_vs_sgd'))}x "
                f"the SGD step; a whole training step, forward + backward {_f(k.get('fwd_bwd_ms'), '.1f')} ms, "
                f"with K-FAC = {_f(k.get('training_step_ratio'))}x without).",
            ]  # fmt: skip
            if any(k.get("skipped_steps", {}).values()):
                lines.append(f"K-FAC skipped steps (non-finite gradients): {k['skipped_steps']}")
    lines += ["", "## Cut by the time caps", ""]
    lines += [f"- {c}" for c in payload["cut"]] or ["nothing"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def write(payload: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (for CI)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results"))
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--budget", type=float, default=None, help="overall seconds (default 440)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PART_NAMES, help="parts to skip")
    args = parser.parse_args(argv)
    cfg = copy.deepcopy(DRY if args.dry_run else FULL)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else cfg["budget"]
    out_dir = Path(args.out)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    start = time.perf_counter()
    payload: dict[str, Any] = {"dry_run": args.dry_run, "machine": machine(device), "args": vars(args),
                               "config": cfg, "budget_seconds": budget, "parts": {}, "cut": []}  # fmt: skip
    print(
        f"gpu_check on {payload['machine'].get('gpu', device)}, budget {budget:.0f} s", flush=True
    )
    cuts: list[str] = payload["cut"]

    def deadline(name: str) -> float:
        """This part's share of the time left, in proportion to the nominal caps of the parts
        still to run (what earlier parts left unused goes to the later ones)."""
        left = budget - (time.perf_counter() - start)
        todo = PART_NAMES[PART_NAMES.index(name) :]
        nominal = sum(float(cfg["caps"][n]) for n in todo if n not in args.skip)
        return min(left, left * float(cfg["caps"][name]) / max(nominal, 1e-9))

    workloads: list[Workload] = []
    optimizers: list[torch.optim.Optimizer] = []

    def ensure_workloads() -> None:
        if not workloads:
            for make, key in ((make_cnn, "cnn"), (make_gpt, "gpt")):
                w = make(cfg[key], device)
                workloads.append(w)
                optimizers.append(w.make_opt(w.net.parameters()))

    for name in PART_NAMES:
        cap = deadline(name)
        if name in args.skip:
            payload["parts"][name] = {"status": "skipped", "seconds": 0.0, "note": "--skip"}
            continue
        if cap <= 1.0:
            payload["parts"][name] = {
                "status": "cut",
                "seconds": 0.0,
                "note": "overall budget spent",
            }
            cuts.append(f"{name}: not run (overall budget spent)")
            continue
        print(f"[{name}] cap {cap:.0f} s", flush=True)
        part_start = time.perf_counter()
        result: dict[str, Any] = {"status": "ok", "cap_seconds": cap}
        n_cuts = len(cuts)
        try:
            if name == "pytest":
                result.update(part_pytest(args, cap, out_dir))
                if result["status"] == "cut":
                    cuts.append(f"pytest: killed after {cap:.0f} s (see output_tail)")
            else:
                ensure_workloads()
                models = []
                for i, (w, opt) in enumerate(zip(workloads, optimizers)):
                    share = (part_start + cap - time.perf_counter()) / (len(workloads) - i)
                    dl = Deadline(share, cuts, f"{name}")
                    if name == "lambda_max":
                        models.append(lambda_model(w, opt, cfg, dl, device))
                    elif name == "hvp":
                        models.append(hvp_model(w, cfg, dl, device))
                    elif name == "memory":
                        models.append(memory_model(w, cfg, dl, device))
                    elif name == "overhead":
                        if not w.step_times:
                            train(w, opt, 3, device)
                        hvp_rows = payload["parts"].get("hvp", {}).get("models", [])
                        hvp_ms = next((r["ms"]["reuse_marginal"] for r in hvp_rows
                                       if r["model"] == w.name and "ms" in r), 1e3 * median(w.step_times))  # fmt: skip
                        models.append(overhead_model(w, cfg, dl, device, median(w.step_times),
                                                     hvp_ms / 1e3, is_gpt=i == 1))  # fmt: skip
                    else:
                        models.append(optim_model(w, cfg, dl, device))
                result["models"] = models
        except Exception as err:  # noqa: BLE001  (one failing part must not lose the others)
            result["status"] = "error"
            result["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            result["traceback"] = traceback.format_exc()[-4000:]
            print(result["traceback"], file=sys.stderr, flush=True)
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        if result["status"] == "ok" and len(cuts) > n_cuts:
            result["status"] = "cut"
        result["seconds"] = time.perf_counter() - part_start
        payload["parts"][name] = result
        payload["total_seconds"] = time.perf_counter() - start
        write(payload, out_dir)
    payload["total_seconds"] = time.perf_counter() - start
    write(payload, out_dir)
    print(markdown(payload))
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'} "
          f"in {payload['total_seconds']:.0f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
