"""Fixtures of the TensorBoard plugin tests: synthetic event files and a live TensorBoard."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

STEPS = list(range(0, 50, 5))
LAYERS = [f"net.{i}" for i in range(6)]


def write_run_a(folder: Path) -> None:
    """Every family, two Sharpness instances, density text, a 2-D landscape file."""
    writer = SummaryWriter(str(folder))
    for step in STEPS:
        lam = 5 + 15 * (1 - math.exp(-step / 15))
        scalars = {
            "sharpness/lambda_max": lam, "sharpness/preconditioned": 0.8 * lam,
            "sharpness/threshold": 20.0, "sharpness/ratio": lam / 20,
            "heldout/lambda_max": lam * 0.9, "heldout/ratio": lam * 0.9 / 20,
            "hessian/lambda_min": -0.5, "hessian/trace": 100.0,
            "hessian/net.0/eig_1": lam / 2, "hessian/rmed/net.0": 3.0,
            "gradient_flow/step_gap": 1e-3 * (1 + step), "kfac/kl_scale": 1.0 - step / 100,
            "kfac/damping": 0.1, "sample_variance/last_over_first": 0.2,
        }  # fmt: skip
        scalars.update({f"hessian/eig_{k}": lam / k for k in (1, 2, 3)})
        scalars.update(
            {
                f"sample_variance/{name}": 0.9 / (1 + i) ** (0.5 + step / 100)
                for i, name in enumerate(LAYERS)
            }
        )
        if step % 20 == 0:
            scalars["gradient_flow/deviation"] = 1e-2 * (1 + step)
        for tag, value in scalars.items():
            writer.add_scalar(f"landscape/{tag}", value, step)
        writer.add_scalar("train_loss", 1.0 / (1 + step), step)
        if step % 15 == 0:
            grid = np.linspace(-1.0, lam, 30)
            density = np.exp(-((grid - lam / 3) ** 2)) + 1e-3
            payload = {"grid": grid.tolist(), "density": density.tolist()}
            writer.add_text("landscape/hessian/density_data", json.dumps(payload), step)
        if step == 5:  # not a density payload: the route skips it
            writer.add_text("landscape/hessian/density_data", "not json", step)
    writer.add_scalar("landscape/sample_variance/skipped", 1, 40)
    writer.add_scalar("landscape/landscape/barrier", 0.3, 45)
    writer.close()
    alphas = betas = np.linspace(-1, 1, 9)
    losses = 0.2 + alphas[None, :] ** 2 + 2 * betas[:, None] ** 2
    t = np.linspace(0, 1, 11)
    np.savez(
        folder / "landscape_step45.npz", step=45, alphas=alphas, betas=betas, losses=losses,
        center=0.2, span=1.0, seed=0, keep_1d=False, bn="batch", t=t,
        interpolation=2.3 * (1 - t) + 0.2 + 0.3 * np.sin(np.pi * t), barrier=0.3,
    )  # fmt: skip


def write_run_b(folder: Path) -> None:
    """One Sharpness (no preconditioned), a 1-D landscape file with a NaN."""
    writer = SummaryWriter(str(folder))
    for step in STEPS:
        writer.add_scalar("landscape/sharpness/lambda_max", 2 + step / 10, step)
        writer.add_scalar("landscape/sharpness/threshold", 6.0, step)
        writer.add_scalar("landscape/sharpness/ratio", (2 + step / 10) / 6, step)
    writer.close()
    alphas = np.linspace(-1, 1, 11)
    losses = 1 + alphas**2
    losses[0] = np.nan
    np.savez(folder / "landscape_step49.npz", step=49, alphas=alphas, losses=losses, center=1.0)


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb_logs")
    write_run_a(root / "a")
    write_run_b(root / "b")
    outside = tmp_path_factory.mktemp("outside")
    write_run_b(outside)
    (root / "linked").symlink_to(outside, target_is_directory=True)  # TensorBoard follows it
    with SummaryWriter(str(root / "c")) as writer:
        writer.add_scalar("landscape/sharpness/lambda_max", 1.0, 0)
    (root / "c" / "landscape_step1.npz").symlink_to(outside / "landscape_step49.npz")
    return root


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        kind = response.headers.get("Content-Type", "")
    return json.loads(body) if kind.startswith("application/json") else body


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def launch(logdir: Path, expected_runs: int, *extra: str) -> str:
    """Start TensorBoard in-process on 127.0.0.1 (free port); wait until the runs are loaded
    (``expected_runs`` runs, the same answer twice in a row)."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(
        argv=[None, "--logdir", str(logdir), "--port", "0", "--host", "127.0.0.1", *extra]
    )
    url = board.launch().rstrip("/")
    deadline, last = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        try:
            runs = get(f"{url}/data/plugin/landscape/runs")["runs"]
        except (urllib.error.URLError, ConnectionError):
            runs = None
        if runs is not None and len(runs) >= expected_runs and runs == last:
            return url
        last = runs
        time.sleep(0.2)
    raise TimeoutError(f"TensorBoard at {url} did not load {expected_runs} runs in 60 s")


@pytest.fixture(scope="session")
def board(logdir: Path) -> Iterator[str]:
    """URL of a TensorBoard over :func:`logdir` (runs until the test session ends)."""
    yield launch(logdir, 4, "--load_fast", "false", "--reload_interval", "1")
