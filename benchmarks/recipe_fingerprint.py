"""Fingerprint of every recipe's logs: run each for a few steps and dump its scalars.

Used to check that a refactor leaves behaviour unchanged: run it before and after, then
``--compare A.json B.json``. Wall-time tags (``time``, ``overhead``, ``seconds``) are reported
apart, since they differ between any two runs.

    PYTHONPATH=. python benchmarks/recipe_fingerprint.py --out before.json [--steps 40]
    python benchmarks/recipe_fingerprint.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = ("time", "overhead", "seconds", "budget", "share")


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(root.rglob("events.out.tfevents.*")):
        run = str(events.parent.relative_to(root))
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[f"{run}/{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def run(recipes: list[str], steps: int) -> dict[str, object]:
    result: dict[str, object] = {}
    for name in recipes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "lightning_landscape",
                "fit",
                "--recipe",
                name,
                f"--trainer.max_steps={steps}",
                "--trainer.max_epochs=-1",
            ]
            env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
            env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            print(name, "rc", proc.returncode, flush=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
            result[name] = {"rc": proc.returncode, "scalars": scalars(Path(tmp))}
    return result


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        sa, sb = a.get(name, {}).get("scalars", {}), b.get(name, {}).get("scalars", {})
        for tag in sorted(set(sa) | set(sb)):
            timing = any(t in tag.lower() for t in TIMING)
            va, vb = sa.get(tag), sb.get(tag)
            if va != vb:
                kind = "timing" if timing else "DIFF"
                bad += not timing
                print(f"{kind:6s} {name}: {tag}: {str(va)[:120]} != {str(vb)[:120]}")
    print("identical" if not bad else f"{bad} non-timing tags differ")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--recipes", nargs="*")
    p.add_argument("--compare", nargs=2)
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        return compare(a, b)
    from lightning_landscape.cli import available_recipes

    names = args.recipes or sorted(available_recipes())
    Path(args.out).write_text(json.dumps(run(names, args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
