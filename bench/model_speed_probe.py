"""CPU speed probe: fwd+bwd+SGD step time of candidate demo models on CIFAR-sized input.

Usage: python bench/model_speed_probe.py [--threads 2] [--batch 128] [--steps 5] [--warmup 2]
                                         [--only SUBSTR] [--wait-quiet SECONDS]
Prints a markdown table: median and min step time over ``--steps`` after ``--warmup`` steps,
own CPU time per step and the CPU share other processes used meanwhile ("foreign load";
anything well above 0% means the wall times are inflated by contention).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `python bench/...`
from sparse_sup.models import build_model  # noqa: E402

_LOG = logging.getLogger("model_speed_probe")

VIT32_4 = {"img_size": 32, "patch_size": 4}
VIT32_8 = {"img_size": 32, "patch_size": 8}


def _resnet18_no_maxpool() -> nn.Module:
    model = build_model("resnet18", 10)
    model.maxpool = nn.Identity()  # keep 7x7/s2 stem, drop only the max-pool
    return model


CANDIDATES: list[tuple[str, Callable[[], nn.Module]]] = [
    ("resnet18 cifar_stem", lambda: build_model("resnet18", 10, cifar_stem=True)),
    ("resnet18 plain (7x7/s2 + maxpool)", lambda: build_model("resnet18", 10)),
    ("resnet18 7x7/s2, no maxpool", _resnet18_no_maxpool),
    ("resnet10t plain", lambda: build_model("resnet10t", 10)),
    ("resnet14t plain", lambda: build_model("resnet14t", 10)),
    ("resnet10t cifar_stem", lambda: build_model("resnet10t", 10, cifar_stem=True)),
    ("vgg19_bn_cifar", lambda: build_model("vgg19_bn_cifar", 10)),
    ("vit_tiny img32 patch4 (64 tok)", lambda: build_model("vit_tiny_patch16_224", 10, kwargs=VIT32_4)),
    ("vit_tiny img32 patch8 (16 tok)", lambda: build_model("vit_tiny_patch16_224", 10, kwargs=VIT32_8)),
    ("test_resnet plain", lambda: build_model("test_resnet", 10)),
    ("test_resnet cifar_stem", lambda: build_model("test_resnet", 10, cifar_stem=True)),
    ("test_vit img32 (patch16, 4 tok)", lambda: build_model("test_vit", 10, kwargs={"img_size": 32})),
    ("test_vit img32 patch4 (64 tok)", lambda: build_model("test_vit", 10, kwargs=VIT32_4)),
]


def _system_busy_s() -> float | None:
    """Busy CPU-seconds of the whole machine so far (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait_s: float, busy_frac: float = 0.15) -> float:
    """Sleep until other processes use < ``busy_frac`` of all CPUs (1 s samples); returns waited s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait_s:
        b0, w0 = _system_busy_s(), time.monotonic()
        time.sleep(1.0)
        b1 = _system_busy_s()
        if b0 is None or b1 is None or (b1 - b0) / ((time.monotonic() - w0) * os.cpu_count()) < busy_frac:
            break
    return time.monotonic() - t0


def time_steps(model: nn.Module, batch: int, steps: int, warmup: int) -> tuple[list[float], float, float]:
    """Per-step wall seconds (fwd, CE loss, bwd, SGD-momentum step), own CPU s/step, foreign load.

    Foreign load = share of all CPUs used by *other* processes while timing (contention check).
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times: list[float] = []
    for i in range(warmup + steps):
        if i == warmup:
            cpu0, sys0, wall0 = time.process_time(), _system_busy_s(), time.perf_counter()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    own = time.process_time() - cpu0
    sys1, wall = _system_busy_s(), time.perf_counter() - wall0
    foreign = float("nan")
    if sys0 is not None and sys1 is not None:
        foreign = max(0.0, (sys1 - sys0 - own) / (wall * os.cpu_count()))
    return times, own / steps, foreign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=10_000, help="for the per-epoch estimate")
    parser.add_argument("--only", default="", help="substring filter on candidate labels")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each model wait up to this many s for other processes to go idle",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="re-measure a model up to N times while foreign load > --max-foreign",
    )
    parser.add_argument("--max-foreign", type=float, default=0.10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    steps_per_epoch = -(-args.train_images // args.batch)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
        f"32x32, fp32, median of {args.steps} after {args.warmup} warm-up; "
        f"epoch = {steps_per_epoch} steps ({args.train_images} imgs)\n"
    )
    print(
        "| model | params (M) | step ms median | step ms min | own CPU ms/step | foreign load | "
        "s/epoch (median) | min for 12 ep (median / min) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, make in CANDIDATES:
        if args.only and args.only not in label:
            continue
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        best_run = None
        for attempt in range(args.retries + 1):
            if args.wait_quiet:
                waited = wait_until_quiet(args.wait_quiet)
                _LOG.warning("%s: waited %.0f s for a quiet machine", label, waited)
            run = time_steps(model, args.batch, args.steps, args.warmup)
            if best_run is None or run[2] < best_run[2]:
                best_run = run
            if run[2] <= args.max_foreign:
                break
            _LOG.warning("%s: attempt %d had %.0f%% foreign load", label, attempt + 1, 100 * run[2])
        ts, cpu_s, foreign = best_run
        med, best = statistics.median(ts), min(ts)
        print(
            f"| {label} | {n_params / 1e6:.2f} | {med * 1e3:.0f} | {best * 1e3:.0f} | {cpu_s * 1e3:.0f} "
            f"| {foreign:.0%} | {med * steps_per_epoch:.0f} | {12 * med * steps_per_epoch / 60:.1f} / "
            f"{12 * best * steps_per_epoch / 60:.1f} |",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
