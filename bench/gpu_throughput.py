"""GPU throughput, bf16: the model step (dense vs sparse_sup masks, ResNet-50 and ViT-S/16 at 224),
and with ``--loop`` the whole training loop (sparse_sup vs a plain compiled PyTorch loop, CIFAR).

Model step (default). One optimizer step = zero_grad + forward (bf16 autocast) + cross-entropy +
backward + SGD (momentum 0.9, wd 5e-4), synthetic inputs already on the GPU, for

* dense      -- the plain step;
* sparse_sup -- the step as the training loop takes it: ``engine.before_optimizer_step()`` (masked
                gradients zeroed) before ``opt.step()``, ``engine.after_optimizer_step()`` (masked
                weights and momentum zeroed, counters advanced) after it; RigL at density 0.1, with
                a budget so large that no topology update happens while timing.

The batch size fills the GPU: with ``--batch 0`` (default) the largest power of two from 32 to
``--max-batch`` whose dense step runs without running out of memory. Variants run side by side:
warm-up, then ``--rounds`` rounds in rotating order of ``--steps`` steps each, timed with CUDA
events; the table shows the median over rounds. Goal: sparse_sup / dense <= 1.01.

Whole loop (``--loop``, issue 19). CIFAR ResNet-18 (CIFAR stem) and ViT-S (32 px, patch 4), batch
256, the bundled CIFAR-10 training images, three loops side by side:

* plain      -- a plain PyTorch loop as a performance engineer writes it: the uint8 images in one
                tensor on the device, a seeded permutation per epoch, pad-4 random crop + flip and
                normalisation as one gather and two passes on the device, channels_last (convnets),
                bf16 autocast, fused SGD (lr 0.1, momentum 0.9, wd 5e-4), ``torch.compile``, the loss
                summed on the device and read every 100 steps for a log line;
* ss_dense   -- the real sparse_sup loop (``Run``, as ``python train.py`` builds it) at density 1.0,
                with what a GPU user sets: train.precision=bf16, train.channels_last (convnets),
                train.compile, data.on_device, a log line every 100 steps;
* ss_sparse  -- the same at RigL density 0.1.

No topology update, phase end or run checkpoint happens while timing. The timing is
bench/throughput.py's: each loop in a thread of its own, a baton letting exactly one run at a time,
a window from the start of one step to the start of the step ``--steps`` later (everything the
loop does: data, masks, logging, host syncs), ``torch.cuda.synchronize()`` at every window boundary,
``--warmup`` windows each (compilation) and then ``--rounds`` rounds in rotating order; the table
shows the median over rounds. Goals: sparse_sup / plain <= 1.05 dense, <= 1.10 sparse.

Usage (GPU): python bench/gpu_throughput.py [--models resnet50 vit_small] [--rounds 5] [--steps 10]
             python bench/gpu_throughput.py --loop [--models resnet18 vit_small] [--rounds 5] [--steps 100]
CPU check that the script runs (fp32, timm test models, tiny batch): python bench/gpu_throughput.py --smoke
             and python bench/gpu_throughput.py --loop --smoke [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import throughput  # noqa: E402  (bench/throughput.py: this script's folder is on sys.path)
from throughput import LR, MOMENTUM, SEED, WD  # noqa: E402

from sparse_sup.backends import LocalBackend  # noqa: E402
from sparse_sup.config import load_config, resolve_plan  # noqa: E402
from sparse_sup.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from sparse_sup.engine import SupTicketsEngine  # noqa: E402
from sparse_sup.models import build_model, select_targets  # noqa: E402

MODELS: dict[str, tuple[str, int]] = {  # name -> (timm model, image size)
    "resnet50": ("resnet50", 224),
    "vit_small": ("vit_small_patch16_224", 224),
    "test_resnet": ("test_resnet", 32),  # --smoke
    "test_vit": ("test_vit", 32),  # --smoke
}
VARIANTS = ("dense", "sparse_sup")
VIT_32 = "{img_size: 32, patch_size: 4}"  # a ViT on CIFAR's 32 px: 8 x 8 patches
LOOP_MODELS: dict[str, tuple[list[str], bool]] = {  # --loop: name -> (sparse_sup overrides, convnet)
    "resnet18": (["--model.name=resnet18", "--model.cifar_stem=true"], True),
    "vit_small": (["--model.name=vit_small_patch16_224", f"--model.kwargs={VIT_32}"], False),
    "test_resnet": (throughput.MODELS["test_resnet"], True),  # --smoke
    "test_vit": (["--model.name=test_vit", f"--model.kwargs={VIT_32}"], False),  # --smoke
}
LOG_EVERY = 100  # --loop: steps between the log lines (the host syncs) of every loop


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


# ----------------------------------------------------------------------------- --loop


class DevicePlainLoop:
    """The plain loop of ``--loop`` (module docstring), on the device, with the model and training
    images of the started sparse_sup run ``run_``: no per-sample Python, no host sync but the log
    line's."""

    def __init__(self, run_, batch: int, convnet: bool, bf16: bool, compile_: bool) -> None:
        device, m, train_set = run_.device, run_.config.model, run_.p.train_set
        self.batch, self.bf16 = batch, bf16
        self.memory_format = torch.channels_last if convnet else torch.contiguous_format
        torch.manual_seed(SEED)  # the sparse_sup runs' initial weights
        model = build_model(m.name, m.num_classes or 10, cifar_stem=m.cifar_stem, kwargs=m.kwargs)
        model = model.to(device, memory_format=self.memory_format)
        fused = device.type == "cuda"
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, fused=fused)
        self.model = torch.compile(model) if compile_ else model
        self.padded = F.pad(train_set.images.to(device), (4, 4, 4, 4))  # padded once: a crop is a gather
        self.labels = train_set.labels.to(device)
        self.mean = 255 * torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
        self.gen = torch.Generator(device).manual_seed(SEED)
        self.log = logging.getLogger("plain")

    def batches(self):
        n, b, device = len(self.labels), self.batch, self.labels.device
        span = torch.arange(self.padded.shape[-1] - 8, device=device)
        while True:
            perm = torch.randperm(n, device=device, generator=self.gen)
            for i in range(n // b):
                idx = perm[i * b : (i + 1) * b]
                top, left = torch.randint(0, 9, (2, b, 1), device=device, generator=self.gen)
                flip = torch.rand(b, 1, device=device, generator=self.gen) < 0.5
                rows, cols = top + span, left + torch.where(flip, span.flip(0), span)  # [B, 32] each
                # one gather, [B, H, W, C] (the advanced indices first): NCHW in channels_last order
                x = self.padded[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
                x = x.contiguous(memory_format=self.memory_format).float().sub_(self.mean).div_(self.std)
                yield x, self.labels[idx]

    def train(self, hook: Callable[[], None]) -> None:
        running = torch.zeros((), device=self.labels.device)
        for step, (x, y) in enumerate(self.batches(), 1):
            hook()
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            running += loss.detach()
            if step % LOG_EVERY == 0:  # the loop's only host sync
                self.log.info("step %d loss %.4f", step, running.item() / LOG_EVERY)
                running.zero_()


def measure_loops(model: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Median seconds per step of the plain loop and of the sparse_sup loop, dense and sparse."""
    overrides, convnet = LOOP_MODELS[model]
    extra = [
        f"--train.precision={'bf16' if args.bf16 else 'fp32'}",
        f"--train.channels_last={str(convnet).lower()}",
        f"--train.compile={str(args.compile).lower()}",
        "--data.on_device=true",
        f"--train.log_every={LOG_EVERY}",
        "--checkpoint.every_steps=null",  # no run checkpoint while timing (the plain loop saves none)
        *args.data,
    ]
    cuda = args.device.type == "cuda"
    runs = {
        name: throughput.sparse_sup_run(overrides, density, args.batch, tmp / name, extra, gpu=cuda)
        for name, density in (("ss_dense", 1.0), ("ss_sparse", 0.1))
    }
    logging.getLogger("sparse_sup").setLevel(logging.WARNING)  # the plain loop's log volume
    plain = DevicePlainLoop(runs["ss_dense"], args.batch, convnet, args.bf16, args.compile)
    loops = {"plain": plain.train, **{n: throughput.train_hooked(r) for n, r in runs.items()}}
    # CUDA runs asynchronously: synchronize at every window boundary, or one loop's queued kernels
    # would run (and be timed) in the next loop's window
    sync = torch.cuda.synchronize if cuda else None
    threads = None if cuda else 1  # a shared CPU: one torch thread per loop, as main() sets
    wall, _ = throughput.time_loops(loops, args.warmup, args.rounds, args.steps, threads=threads, sync=sync)
    return wall


def loop_table(args: argparse.Namespace, where: str) -> None:
    plain = f"plain{' compiled' if args.compile else ''}"
    now = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"# bench/gpu_throughput.py --loop, {now:%Y-%m-%d %H:%M} UTC\n"
        f"{where}, torch {torch.__version__}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"torch.compile {'on' if args.compile else 'off'}, {args.rounds} rounds x {args.steps} steps "
        "(median over rounds), whole training loop; goals (issue 19): whole loop / plain compiled loop "
        "<= 1.05 dense, <= 1.10 sparse\n\n"
        f"| model | image | batch | {plain} s/step | plain steps/s | sparse_sup dense s/step | dense / plain "
        "| sparse_sup sparse s/step | sparse / plain |\n|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            t = measure_loops(model, args, Path(tmp))
            p, d, s = t["plain"], t["ss_dense"], t["ss_sparse"]
            print(
                f"| {model} | 32 | {args.batch} | {p:.4f} | {1 / p:.1f} | {d:.4f} | {d / p:.3f} | "
                f"{s:.4f} | {s / p:.3f} |",
                flush=True,
            )


# ----------------------------------------------------------------------------- the tables


def step_table(args: argparse.Namespace, where: str) -> None:
    device, bf16 = args.device, args.bf16
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loop", action="store_true", help="the whole training loop against a plain loop")
    ap.add_argument("--models", nargs="+", choices=sorted({*MODELS, *LOOP_MODELS}))
    ap.add_argument("--batch", type=int, default=0, help="0: the largest power of two that fits; --loop 256")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (0: 10, with --loop 100)")
    ap.add_argument("--warmup", type=int, default=1, help="--loop: windows per loop before timing")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, help="--loop (default: on a GPU)")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, timm test models, tiny batch")
    args = ap.parse_args()
    table = LOOP_MODELS if args.loop else MODELS
    args.models = args.models or (["resnet18", "vit_small"] if args.loop else ["resnet50", "vit_small"])
    args.steps = args.steps or (LOG_EVERY if args.loop else 10)  # --loop: one log line per window
    args.batch = args.batch or (256 if args.loop else 0)
    args.data = []
    if args.smoke:
        args.models, args.rounds = ["test_resnet", "test_vit"], 2
        args.batch, args.steps = (8, 2) if args.loop else (4, 1)
        args.data = ["--data.max_train_samples=256", "--data.max_eval_samples=64"]
    if unknown := [m for m in args.models if m not in table]:
        ap.error(f"{unknown}: {'--loop' if args.loop else 'the model step'} measures {', '.join(table)}")
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: more threads only contend
    args.bf16 = args.device.type == "cuda"  # bf16 autocast of BatchNorm models fails on CPU
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name()
    else:
        where = "CPU (smoke: checks that the script runs; the numbers mean nothing)"
    logging.basicConfig(level=logging.WARNING)
    (loop_table if args.loop else step_table)(args, where)


if __name__ == "__main__":
    main()
