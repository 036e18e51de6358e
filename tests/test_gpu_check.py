"""``benchmarks/gpu_check.py --dry-run`` runs on the CPU and writes its JSON and Markdown.

The script is the one prepared device run (CUDA tests + GPU timings); this keeps it runnable
where no GPU is: tiny models, a few iterations, one thread, CPU device, pytest part collecting
only. Its numbers mean nothing; the structure of what it writes is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("pytest", "lambda_max", "hvp", "memory", "overhead", "optimizers")


def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()

    assert payload["dry_run"] is True
    assert {"machine", "args", "config", "parts", "cut", "total_seconds"} <= payload.keys()
    assert payload["machine"]["device"] == "cpu"
    parts = payload["parts"]
    assert tuple(parts) == PARTS
    for name in PARTS:
        assert parts[name]["status"] == "ok", (
            name,
            parts[name].get("error"),
            parts[name].get("traceback"),
        )
        assert parts[name]["seconds"] >= 0
    # pytest: collection only (nothing selected), the command recorded
    assert parts["pytest"]["returncode"] == 5 and "-m cuda" in parts["pytest"]["command"]
    # λ_max: both models, every method with value/HVPs/seconds/error; the anchor is named
    lam = parts["lambda_max"]["models"]
    assert len(lam) == 2 and {m["model"].split()[0] for m in lam} == {"ResNet-18", "GPT"}
    for model in lam:
        assert model["anchor"] in model["methods"] and "ours-warm" in model["methods"]
        assert model["steady_points"] >= 1
        for method in model["methods"]:
            summary = model["summary"][method]
            assert {
                "hvps_median",
                "ms_median",
                "train_steps",
                "err_median",
                "anchor_over_this",
            } <= summary.keys()
            # ours agree with the reference; PyHessian's power iteration (present when the
            # bench extra is installed) stops on a relative change and may be further off
            assert summary["err_median"] < (1e-2 if method != "pyhessian" else 0.2), method
        for point in model["points"]:
            assert point["ours-warm"]["hvps"] <= 20 and point["lanczos20"]["hvps"] == 20
    for model in parts["hvp"]["models"]:
        assert {
            "gradient",
            "reuse_first",
            "reuse_marginal",
            "reuse_amortised",
            "no_reuse",
        } <= model["ratios"].keys()
    for model in parts["memory"]["models"]:
        assert {"reuse_graph=True", "reuse_graph=False"} <= model["rows"].keys()
        assert model["rows"]["reuse_graph=True"]["peak_above_mib"] is None  # no CUDA here
    for model in parts["overhead"]["models"]:
        assert {
            "fit_ratio",
            "loop_ratio",
            "step0_seconds",
            "own_share",
            "measurements",
        } <= model.keys()
        assert model["measurements"] == {"Sharpness": 1, "HessianEigenvalues": 1}  # step 0
        assert len(model["runs"]) == 4
    for model in parts["optimizers"]["models"]:
        rows = model["rows"]
        assert {
            "NovoGrad (foreach)",
            "ARSG (foreach)",
            "Adam (foreach)",
            "SGD+momentum (foreach)",
        } <= rows.keys()
        assert rows["NovoGrad (foreach)"]["vs_anchor"] > 0
        kfac = model["kfac"]
        assert kfac["amortised_ms"] is not None and kfac["fwd_bwd_ms"] > 0
    # Markdown: one section per part, the cut list at the end
    for title in ("## 0. CUDA tests", "## 1. λ_max", "## 2. HVP", "## 3. Peak memory",
                  "## 4. Overhead", "## 5. Optimizer", "## Cut by the time caps"):  # fmt: skip
        assert title in md, title
    assert "| ours-warm |" in md and "| NovoGrad (foreach) |" in md
