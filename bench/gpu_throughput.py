"""GPU model-step throughput, bf16: dense vs sparse_sup masks, ResNet-50 and ViT-S/16 at 224.

One optimizer step = zero_grad + forward (bf16 autocast) + cross-entropy + backward + SGD
(momentum 0.9, wd 5e-4), synthetic inputs already on the GPU, for

* dense      -- the plain step;
* sparse_sup -- the step as the training loop takes it: ``engine.before_optimizer_step()`` (masked
                gradients zeroed) before ``opt.step()``, ``engine.after_optimizer_step()`` (masked
                weights and momentum zeroed, counters advanced) after it; RigL at density 0.1, with
                a budget so large that no topology update happens while timing.

The batch size fills the GPU: with ``--batch 0`` (default) the largest power of two from 32 to
``--max-batch`` whose dense step runs without running out of memory. Variants run side by side:
warm-up, then ``--rounds`` rounds in rotating order of ``--steps`` steps each, timed with CUDA
events; the table shows the median over rounds. Goal: sparse_sup / dense <= 1.01.

Usage (GPU): python bench/gpu_throughput.py [--models resnet50 vit_small] [--rounds 5] [--steps 10]
CPU check that the script runs (fp32, timm test models, tiny batch): python bench/gpu_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_sup.backends import LocalBackend  # noqa: E402
from sparse_sup.config import load_config, resolve_plan  # noqa: E402
from sparse_sup.engine import SupTicketsEngine  # noqa: E402
from sparse_sup.models import build_model, select_targets  # noqa: E402

MODELS: dict[str, tuple[str, int]] = {  # name -> (timm model, image size)
    "resnet50": ("resnet50", 224),
    "vit_small": ("vit_small_patch16_224", 224),
    "test_resnet": ("test_resnet", 32),  # --smoke
    "test_vit": ("test_vit", 32),  # --smoke
}
VARIANTS = ("dense", "sparse_sup")


def make_step(variant: str, model_name: str, size: int, batch: int, device: torch.device, bf16: bool):
    """A fresh model, optimizer (and engine) for ``variant``; returns a closure taking one step."""
    torch.manual_seed(0)
    kwargs = {"img_size": size} if "vit" in model_name else {}
    model = build_model(model_name, 1000, kwargs=kwargs).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    engine = None
    if variant == "sparse_sup":
        overrides = [
            "--sparse.method=rigl",
            "--sparse.density=0.1",
            "--sparse.update_interval=1000000",
            "--tickets.num_cycles=0",
            "--schedule.epochs=1000",
        ]
        cfg = load_config(None, overrides)
        plan = resolve_plan(cfg, num_train_samples=128 * 100000)
        engine = SupTicketsEngine.from_config(cfg, plan, LocalBackend(model, opt, select_targets(model)))
        engine.init_masks()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        if engine is not None:
            engine.before_optimizer_step()
        opt.step()
        if engine is not None:
            engine.after_optimizer_step()

    return step


def largest_batch(model_name: str, size: int, device: torch.device, bf16: bool, cap: int) -> int:
    """The largest power of two (32..cap) whose dense step fits in GPU memory."""
    best, batch = 0, 32
    while batch <= cap:
        try:
            step = make_step("dense", model_name, size, batch, device, bf16)
            step()
            torch.cuda.synchronize()
            best = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            torch.cuda.empty_cache()
        batch *= 2
    if not best:
        raise RuntimeError(f"{model_name}: not even a batch of 32 fits in GPU memory")
    return best


def timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    def cuda_time(fn: Callable[[], None], steps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps

    def cpu_time(fn: Callable[[], None], steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    return cuda_time if device.type == "cuda" else cpu_time


def measure(model: str, batch: int, device: torch.device, bf16: bool, rounds: int, steps: int) -> dict:
    name, size = MODELS[model]
    runners = {v: make_step(v, name, size, batch, device, bf16) for v in VARIANTS}
    clock = timer(device)
    for run in runners.values():  # warm-up (cuDNN autotuning, allocator)
        clock(run, 3)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % 2 :] + VARIANTS[: r % 2]:
            times[v].append(clock(runners[v], steps))
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet50", "vit_small"])
    ap.add_argument("--batch", type=int, default=0, help="0: the largest power of two that fits")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, timm test models, batch 4")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.batch, args.rounds, args.steps = ["test_resnet", "test_vit"], 4, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: more threads only contend
    bf16 = device.type == "cuda"  # bf16 autocast of BatchNorm models fails on CPU
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name()
    else:
        where = "CPU (smoke: checks that the script runs; the numbers mean nothing)"
    print(
        f"# bench/gpu_throughput.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"{where}, torch {torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}, "
        f"{args.rounds} rounds x {args.steps} steps (median over rounds)\n\n"
        "| model | image | batch | dense s/step | dense img/s | sparse_sup s/step | sparse_sup / dense |\n"
        "|---|---|---|---|---|---|---|",
        flush=True,
    )
    for model in args.models:
        name, size = MODELS[model]
        batch = args.batch or largest_batch(name, size, device, bf16, args.max_batch)
        t = measure(model, batch, device, bf16, args.rounds, args.steps)
        print(
            f"| {name} | {size} | {batch} | {t['dense']:.4f} | {batch / t['dense']:.0f} | "
            f"{t['sparse_sup']:.4f} | {t['sparse_sup'] / t['dense']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
