"""CUDA tests: the ``cuda`` marker, and deterministic cuBLAS before any CUDA work.

Every test here is marked ``cuda`` and skipped without a CUDA device, so the default CPU run
collects and skips them; on a GPU machine run them with ``python -m pytest -m cuda tests/cuda``
(``benchmarks/gpu_check.py`` does, before its timings).
"""

from __future__ import annotations

import os

import pytest

# bit-identical comparisons on CUDA need a deterministic cuBLAS workspace (set before the first
# cuBLAS handle is created; Lightning's deterministic=True would set it too late for a process
# that already ran CUDA work)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA device (skipped without one); run with `pytest -m cuda tests/cuda`",
    )
