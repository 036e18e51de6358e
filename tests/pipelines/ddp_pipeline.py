"""Row 9 of the pipeline conformance table: DDP through Lightning's ``strategy="ddp"``.

Run from the repository root as ``python -m tests.pipelines.ddp_pipeline OUT_DIR``
(``test_pipelines.test_ddp_pipeline`` does). Lightning's launcher re-runs this command with
``LOCAL_RANK=1`` for the second CPU process (gloo); both ranks fit the hand-written SDPA GPT
without callbacks and then with every column of ``conformance.COLUMNS``, run the same checks
as the single-process rows and write ``OUT_DIR/rank<r>.json`` (world size, the failed checks,
and the rank's ``landscape/*`` records, which must be the same on both ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .conformance import failures, fit, landscape_records, make_columns
from .models import Pipeline, TinyGPT, lm_data

PIPELINE = Pipeline("ddp_sdpa_gpt", TinyGPT, lm_data)


def main(out: str) -> None:
    torch.set_num_threads(1)
    ddp = {"strategy": "ddp", "devices": 2}
    ref = fit(PIPELINE, [], str(Path(out) / "reference"), **ddp)
    got = fit(PIPELINE, make_columns(), str(Path(out) / "callbacks"), **ddp)
    result = {
        "world_size": got.world_size,
        "failures": failures(ref, got),
        "landscape": sorted([s, k, v] for (s, k), v in landscape_records(got).items()),
    }
    (Path(out) / f"rank{got.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
