"""CPU speed probe: fwd+bwd+SGD step time of candidate demo models on CIFAR-sized input.

Usage: python bench/model_speed_probe.py [--threads 2] [--batch 128] [--steps 5] [--warmup 2]
Prints a markdown table (median step time over ``--steps`` after ``--warmup`` steps).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

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


def time_steps(model: nn.Module, batch: int, steps: int, warmup: int) -> list[float]:
    """Seconds per train step (forward, CE loss, backward, SGD momentum step)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=10_000, help="for the per-epoch estimate")
    parser.add_argument("--only", default="", help="substring filter on candidate labels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    steps_per_epoch = -(-args.train_images // args.batch)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"32x32, fp32, median of {args.steps} after {args.warmup} warm-up; "
          f"epoch = {steps_per_epoch} steps ({args.train_images} imgs)\n")
    print("| model | params (M) | step ms (median) | min-max ms | img/s | s/epoch (train) | min for 12 ep |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, make in CANDIDATES:
        if args.only and args.only not in label:
            continue
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        ts = time_steps(model, args.batch, args.steps, args.warmup)
        med = statistics.median(ts)
        epoch_s = med * steps_per_epoch
        print(f"| {label} | {n_params / 1e6:.2f} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f} "
              f"| {args.batch / med:.0f} | {epoch_s:.0f} | {12 * epoch_s / 60:.1f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
