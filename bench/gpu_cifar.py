"""Short CIFAR-10 comparison on one GPU: ResNet-18 (CIFAR stem) RigL vs RigL + Sup-tickets, bf16,
with the decoded training and test images kept on the GPU.

Both runs are the real training loop (``sparse_sup.train.loop.Run``, as ``python train.py`` builds
it) with the same config except ``tickets.num_cycles`` (0 = the base method for the whole budget,
3 = Sup-tickets with the default job's ticket recipe from configs/debug-cpu.yaml, its cycles in
10% of the budget). With ``data.on_device=true`` the in-memory uint8 images of the training,
BN-recalibration and test sets live on the GPU, so sampling, crop + flip and normalisation run
there and no batch crosses PCIe. Prints each run's result table, its wall time and optimizer steps
per second.

Usage (GPU): python bench/gpu_cifar.py [--data ../shared/data/cifar10] [--epochs 20] [--batch 256]
CPU check that the script runs (tiny test model, 256 bundled images): python bench/gpu_cifar.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_sup.config import load_config  # noqa: E402


def train_once(overrides: list[str], out: Path, device: torch.device, precision: str) -> tuple[dict, float]:
    from accelerate import Accelerator

    from sparse_sup.results import summary_table
    from sparse_sup.train.loop import Run
    from sparse_sup.train.setup import prepare

    config = load_config(
        str(ROOT / "configs" / "debug-cpu.yaml"), [*overrides, f"--experiment.output_dir={out}"]
    )
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    run = Run(prepare(config), accelerator)
    run.start()
    t0 = time.perf_counter()
    summary = run.train()
    wall = time.perf_counter() - t0
    print(summary_table(summary), flush=True)
    return summary, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--update-interval", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="CPU, test_resnet, 256 bundled images")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    data = args.data if Path(args.data).exists() else "bundled"
    common = [
        f"--data.source={data}",
        "--model.name=resnet18",
        "--model.cifar_stem=true",
        f"--schedule.epochs={args.epochs:g}",
        f"--schedule.batch_size={args.batch}",
        f"--optim.lr={args.lr}",
        "--sparse.method=rigl",
        "--sparse.density=0.1",
        f"--sparse.update_interval={args.update_interval}",
        "--tickets.cycles_fraction=0.1",
        "--tickets.bn_recal_batches=20",
        "--data.eval_batch_size=1000",
        "--train.progress_bar=false",
        "--train.log_every=100",
        "--experiment.overwrite=true",
        "--data.on_device=true",
    ]
    precision = "bf16" if cuda else "no"
    if args.smoke:
        torch.set_num_threads(1)
        common += [
            "--model.name=test_resnet",
            "--model.cifar_stem=false",
            "--data.max_train_samples=256",
            "--data.max_eval_samples=64",
            "--data.eval_batch_size=64",
            "--schedule.epochs=8",
            "--schedule.batch_size=32",
            "--sparse.update_interval=4",
            "--tickets.bn_recal_batches=1",
        ]
    logging.basicConfig(level=logging.WARNING)
    where = torch.cuda.get_device_name() if cuda else "CPU (smoke: checks that the script runs)"
    print(
        f"# bench/gpu_cifar.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {where}, "
        f"data {data} kept on {device.type}, {precision}\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = []
        for label, cycles in (("RigL (base, whole budget)", 0), ("RigL + Sup-tickets", 3)):
            print(f"## {label}", flush=True)
            summary, wall = train_once(
                [*common, f"--tickets.num_cycles={cycles}"], out / f"cycles{cycles}", device, precision
            )
            rows.append((label, summary, wall))
    print("\n| run | final accuracy | steps | wall s | steps/s |\n|---|---|---|---|---|")
    for label, summary, wall in rows:
        steps = summary["steps_completed"]
        acc = 100 * summary["results"]["final"]["accuracy"]
        print(f"| {label} | {acc:.2f}% | {steps} | {wall:.0f} | {steps / wall:.1f} |")


if __name__ == "__main__":
    main()
