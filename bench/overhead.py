"""Per-step overhead of sparse_sup masks vs. a dense step and vs. ``torch.nn.utils.prune`` (CPU).

Measured: wall time of one optimizer step = zero_grad + forward + cross-entropy + backward +
SGD(momentum 0.9, wd 5e-4) step, fp32, batch 64 of 3x32x32 inputs, 10 classes, 2 threads, for

* dense      -- the plain step;
* sparse_sup -- the step as the training loop takes it: ``engine.before_optimizer_step()`` (mask
                the gradients) before ``opt.step()``, ``engine.after_optimizer_step()`` (re-zero
                masked weights and momentum, advance the counter) after it; RigL at density 0.1,
                with a budget so large that no topology update or cycle happens while timing;
* grad mask  -- the same with ``sparse.enforce_every_step=false`` (gradient masking only);
* prune      -- ``torch.nn.utils.prune.l1_unstructured(amount=0.9)`` on the same target weights
                (forward recomputes ``weight = weight_orig * weight_mask``).

Every variant has its own model built from the same seed. Other processes may share the CPU, so
the variants run side by side: 2 warm-up steps each, then ``--rounds`` rounds in which each
variant (rotating order) runs ``--steps`` steps; the table shows the median over rounds of the
mean step time. Goal: sparse_sup ratio to dense <= 1.03.

Usage: PYTHONPATH=. python bench/overhead.py [--models resnet18 vit_tiny] [--rounds 5] [--steps 3]
       [--batch 64]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from sparse_sup.backends import LocalBackend
from sparse_sup.config import load_config, resolve_plan
from sparse_sup.engine import SupTicketsEngine
from sparse_sup.models import build_model, select_targets

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet18": lambda: build_model("resnet18", 10, cifar_stem=True),
    "vit_tiny": lambda: build_model("vit_tiny_patch16_224", 10, kwargs={"img_size": 32, "patch_size": 4}),
}
VARIANTS = ("dense", "sparse_sup", "grad_mask", "prune")
SEED, LR = 0, 0.01


def make_step(variant: str, build: Callable[[], torch.nn.Module], batch: int) -> Callable[[], None]:
    """A fresh model + optimizer for ``variant``; returns a closure taking one optimizer step."""
    torch.manual_seed(SEED)
    model = build().train()
    names = select_targets(model)
    if variant == "prune":
        for name in names:
            module_name, attr = name.rsplit(".", 1)
            prune.l1_unstructured(model.get_submodule(module_name), attr, amount=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    engine = None
    if variant in ("sparse_sup", "grad_mask"):
        overrides = [
            "--sparse.method=rigl",
            "--sparse.density=0.1",
            "--sparse.update_interval=1000000",
            "--tickets.num_cycles=0",
            "--schedule.epochs=1000",
        ]
        if variant == "grad_mask":
            overrides.append("--sparse.enforce_every_step=false")
        cfg = load_config(None, [*overrides, f"--optim.lr={LR}", f"--experiment.seed={SEED}"])
        plan = resolve_plan(cfg, num_train_samples=64 * 100000)  # no update / cycle while timing
        engine = SupTicketsEngine.from_config(cfg, plan, LocalBackend(model, opt, names))
        engine.init_masks()
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if engine is not None:
            engine.before_optimizer_step()
        opt.step()
        if engine is not None:
            engine.after_optimizer_step()

    return step


def measure(build: Callable[[], torch.nn.Module], batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median (over rounds) seconds per step of each variant, the variants interleaved."""
    runners = {v: make_step(v, build, batch) for v in VARIANTS}
    for run in runners.values():  # warm-up
        for _ in range(2):
            run()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # rotate the order
            t0 = time.perf_counter()
            for _ in range(steps):
                runners[v]()
            times[v].append((time.perf_counter() - t0) / steps)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps (median over rounds)\n"
    )
    print(
        "| model | dense s/step | sparse_sup s/step | ratio | sparse_sup (grad mask only) ratio "
        "| torch.nn.utils.prune s/step | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        t = measure(MODELS[name], args.batch, args.rounds, args.steps)
        d = t["dense"]
        print(
            f"| {name} | {d:.4f} | {t['sparse_sup']:.4f} | {t['sparse_sup'] / d:.3f} "
            f"| {t['grad_mask'] / d:.3f} | {t['prune']:.4f} | {t['prune'] / d:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
