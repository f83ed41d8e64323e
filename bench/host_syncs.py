"""Host reads ("syncs") per optimizer step of the CLI loop and per exact top-k, before and after
issue 19's item 1, side by side in one run (CPU; on a GPU each read waits for the device).

* **loop**: ``python train.py`` on ``configs/tiny-test.yaml`` (timm ``test_resnet``, batch 64,
  bundled CIFAR-10, fused SGD via ``optim.fused=true``, ``sparse.update_interval=8``, log every 8,
  one injected non-finite step), one process: reads per steady-state step (no log / mask event at
  it or the next step), per mask-update step (the top-k of every layer); then the same run without
  the counter, ``--rounds`` times per tree interleaved: the loop's own ``steps_per_s`` (mean of its
  log windows) and the CPU seconds of the process (medians; on a CPU a read costs nothing, so these
  only say the change costs no time here).
* **top-k**: ``core.select.top_k_masks`` over ResNet-18-sized pieces (one group per layer, 11.2 M
  float32 scores, k = 10%), reads and wall seconds (median of 3).

"before" is a git worktree at ``--before`` (default: the commit before item 1) with this tree's
``sparse_sup/train/host_syncs.py`` and worker copied in. Prints a markdown table.

Usage: python bench/host_syncs.py [--before COMMIT] [--steps 24] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = "tests/integration/host_sync_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def loop_args(steps: int, out: Path) -> list[str]:
    return [
        "--config",
        "configs/tiny-test.yaml",
        f"--train.max_steps={steps}",
        "--sparse.update_interval=8",
        "--train.log_every=8",
        "--train.nonfinite_steps=[5]",
        "--optim.fused=true",
        f"--experiment.output_dir={out}",
    ]


def measure_loop(tree: Path, steps: int, work: Path) -> dict:
    counted = subprocess.run(
        [sys.executable, WORKER, str(work / "syncs"), *loop_args(steps, work / "counted")],
        cwd=tree, env={**ENV, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if counted.returncode != 0:
        raise RuntimeError(counted.stderr[-3000:])
    records = json.loads((work / "syncs.rank0.json").read_text())

    def loop_reads(r: dict) -> int:  # the input path's own reads (sparse_sup/data) counted apart
        return sum(n for site, n in r["sites"].items() if not site.startswith("data/"))

    steady = [loop_reads(r) for r in records if r["attempt"] > 0 and r["step"] % 8 not in (0, 7)]
    update = [loop_reads(r) for r in records if r["step"] % 8 == 0 and 0 < r["step"] < steps]
    data = [sum(n for s, n in r["sites"].items() if s.startswith("data/")) for r in records]
    return {
        "steady": statistics.median(steady),
        "steady_max": max(steady),
        "update": statistics.median(update) if update else float("nan"),
        "data": statistics.median(data),
    }


def plain_run(tree: Path, steps: int, out: Path) -> tuple[float, float]:
    """(the loop's steps/s, mean over its log windows; CPU seconds of the whole process) of one
    uncounted run. CPU time is what a busy shared machine distorts least."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    plain = subprocess.run(
        [sys.executable, "train.py", *loop_args(steps, out)],
        cwd=tree, env={**ENV, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if plain.returncode != 0:
        raise RuntimeError(plain.stderr[-3000:])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["steps_per_s"] for x in lines if '"event": "train"' in x]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return statistics.mean(rates), cpu


def measure_top_k(tree: Path, smoke: bool) -> dict:
    code = f"""
import json, statistics, sys, time, torch
sys.path.insert(0, {str(tree)!r})
torch.manual_seed(0)
from sparse_sup.core.select import Piece, top_k_masks
from sparse_sup.train.host_syncs import HostSyncCounter
import timm
model = timm.create_model({"'test_resnet'" if smoke else "'resnet18'"}, num_classes=10)
weights = [p for p in model.parameters() if p.ndim > 1]
pieces = [Piece(p.detach().abs(), i, 0) for i, p in enumerate(weights)]
k = [max(1, p.scores.numel() // 10) for p in pieces]
times = []
for _ in range(3):
    with HostSyncCounter() as c:
        t = time.perf_counter(); masks = top_k_masks(pieces, k); times.append(time.perf_counter() - t)
assert [int(m.sum()) for m in masks] == k
print(json.dumps({{"reads": c.count, "seconds": statistics.median(times),
                  "elements": sum(p.scores.numel() for p in pieces), "groups": len(pieces)}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=ENV, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default="53f3d57", help="the commit to compare against")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="uncounted runs per tree, interleaved")
    parser.add_argument("--smoke", action="store_true", help="16 steps, test_resnet top-k")
    args = parser.parse_args()
    steps = 16 if args.smoke else args.steps
    with tempfile.TemporaryDirectory(prefix="host_syncs_") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(before), args.before], cwd=ROOT, check=True
        )
        try:
            for rel in ("sparse_sup/train/host_syncs.py", WORKER):
                shutil.copy(ROOT / rel, before / rel)
            rows = {}
            for name, tree in (("before", before), ("after", ROOT)):
                work = tmp / f"work-{name}"
                work.mkdir()
                t = time.perf_counter()
                rows[name] = {**measure_loop(tree, steps, work), "top_k": measure_top_k(tree, args.smoke)}
                print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
            rounds = 1 if args.smoke else args.rounds
            for r in range(rounds):  # interleaved: before, after, before, after, ...
                for name, tree in (("before", before), ("after", ROOT)):
                    rate, cpu = plain_run(tree, steps, tmp / f"plain-{name}-{r}")
                    rows[name].setdefault("rates", []).append(rate)
                    rows[name].setdefault("cpu", []).append(cpu)
            for row in rows.values():
                row["steps_per_s"] = statistics.median(row["rates"])
                row["cpu_s"] = statistics.median(row["cpu"])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    b, a = rows["before"], rows["after"]
    tk = a["top_k"]
    print(f"\nHost reads per optimizer step, one process, {steps} steps (before = {args.before}):\n")
    print("| | before | after | after / before |")
    print("|---|---|---|---|")
    print(
        f"| reads per steady-state step (median; max) | {b['steady']:g}; {b['steady_max']} "
        f"| {a['steady']:g}; {a['steady_max']} | |"
    )
    print(
        f"| reads per mask-update step (median) | {b['update']:g} | {a['update']:g} "
        f"| {a['update'] / b['update']:.2f} |"
    )
    print(f"| reads in the input path per step (data/, issue 21) | {b['data']:g} | {a['data']:g} | |")
    print(
        f"| steps/s, wall (no counter; median of {len(a['rates'])} runs) | {b['steps_per_s']:.2f} "
        f"| {a['steps_per_s']:.2f} | {a['steps_per_s'] / b['steps_per_s']:.2f} |"
    )
    print(
        f"| CPU seconds of the whole run (process; median) | {b['cpu_s']:.2f} "
        f"| {a['cpu_s']:.2f} | {a['cpu_s'] / b['cpu_s']:.2f} |"
    )
    print(
        f"| top-k: reads ({tk['groups']} layers, {tk['elements'] / 1e6:.1f} M scores, k = 10%) "
        f"| {b['top_k']['reads']} | {tk['reads']} | |"
    )
    print(
        f"| top-k: seconds (median of 3) | {b['top_k']['seconds']:.3f} | {tk['seconds']:.3f} "
        f"| {tk['seconds'] / b['top_k']['seconds']:.2f} |"
    )


if __name__ == "__main__":
    main()
