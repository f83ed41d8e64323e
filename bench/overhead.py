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
                (forward recomputes ``weight = weight_orig * weight_mask``);
* ao_sparsifier -- ``torch.ao.pruning.WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=
                (1, 1), zeros_per_block=1)`` prepared on the same targets: a ``FakeSparsity``
                parametrization multiplies each weight by its mask in every forward. Its
                ``step()`` computes the masks of 2-d (Linear) weights; its mask code does not handle
                4-d conv weights, so those get the equivalent |w| top-10% mask written into the
                same parametrization (the timed step does not depend on how the mask was chosen).

Models: ``resnet18`` (CIFAR stem), ``resnet50`` (CIFAR stem, the CIFAR recipe's model),
``vit_tiny`` (patch 4 at 32x32: 64 tokens). Every variant has its own model built from the same
seed. Other processes may share the CPU, so the variants run side by side: 2 warm-up steps each,
then ``--rounds`` rounds in which each variant (rotating order) runs ``--steps`` steps; the table
shows the median over rounds of the mean step time, in CPU seconds of the (single-threaded)
process -- robust to other processes on a shared machine -- and in wall seconds.
Goal: sparse_sup ratio to dense <= 1.03.

Usage: python bench/overhead.py [--models resnet18 resnet50 vit_tiny] [--rounds 5] [--steps 3]
       [--batch 64] [--threads 1] [--profile] [--smoke]

``--profile`` runs torch.profiler over ``--steps`` steps of dense and of sparse_sup and prints the
ops whose self CPU time differs the most (where a ratio above 1 comes from).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `python bench/...`

from sparse_sup.backends import LocalBackend  # noqa: E402
from sparse_sup.config import load_config, resolve_plan  # noqa: E402
from sparse_sup.engine import SupTicketsEngine  # noqa: E402
from sparse_sup.models import build_model, select_targets  # noqa: E402

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet18": lambda: build_model("resnet18", 10, cifar_stem=True),
    "resnet50": lambda: build_model("resnet50", 10, cifar_stem=True),
    "vit_tiny": lambda: build_model("vit_tiny_patch16_224", 10, kwargs={"img_size": 32, "patch_size": 4}),
    "test_resnet": lambda: build_model("test_resnet", 10),  # --smoke
}
VARIANTS = ("dense", "sparse_sup", "grad_mask", "prune", "ao_sparsifier")
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
    if variant == "ao_sparsifier":
        ao_sparsify(model, names)
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


def ao_sparsify(model: torch.nn.Module, names: list[str], sparsity: float = 0.9) -> None:
    """``WeightNormSparsifier`` FakeSparsity parametrizations on ``names`` (see the docstring)."""
    from torch.ao.pruning import WeightNormSparsifier

    sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": n} for n in names])
    linear = [g for g in sparsifier.groups if g["module"].parametrizations.weight.original.ndim == 2]
    for group in linear:  # the sparsifier's own mask computation, where it supports the shape
        sparsifier.update_mask(**group)
    for group in sparsifier.groups:
        if group in linear:
            continue
        parametrization = group["module"].parametrizations.weight
        w = parametrization.original.detach().abs().flatten()
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[w.topk(max(1, round((1 - sparsity) * w.numel()))).indices] = True
        parametrization[0].mask.copy_(mask.view_as(parametrization.original))


def measure(build: Callable[[], torch.nn.Module], batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median (over rounds) seconds per step of each variant, the variants interleaved."""
    runners = {v: make_step(v, build, batch) for v in VARIANTS}
    for run in runners.values():  # warm-up
        for _ in range(2):
            run()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # rotate the order
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                runners[v]()
            times[v].append((time.perf_counter() - t0) / steps)
            cpu[v].append((time.thread_time() - c0) / steps)
    return {v: statistics.median(ts) for v, ts in times.items()} | {
        f"cpu_{v}": statistics.median(ts) for v, ts in cpu.items()
    }


def profile(build: Callable[[], torch.nn.Module], batch: int, steps: int, top: int = 12) -> None:
    """torch.profiler self-CPU time per op of ``steps`` steps, dense vs sparse_sup."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for variant in ("dense", "sparse_sup"):
        step = make_step(variant, build, batch)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        tables[variant] = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    keys = set(tables["dense"]) | set(tables["sparse_sup"])
    diff = sorted(keys, key=lambda k: -abs(tables["sparse_sup"].get(k, 0) - tables["dense"].get(k, 0)))
    total = {v: sum(t.values()) for v, t in tables.items()}
    print(f"\nself CPU ms per step: dense {total['dense']:.1f}, sparse_sup {total['sparse_sup']:.1f}")
    print("| op | dense ms/step | sparse_sup ms/step | difference |\n|---|---|---|---|")
    for k in diff[:top]:
        d, s_ = tables["dense"].get(k, 0.0), tables["sparse_sup"].get(k, 0.0)
        print(f"| `{k}` | {d:.2f} | {s_:.2f} | {s_ - d:+.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet18", "resnet50", "vit_tiny"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler: where dense and sparse_sup differ"
    )
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on timm's test_resnet")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.rounds, args.steps, args.batch = ["test_resnet"], 2, 1, 8
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps (median over rounds), "
        f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) on {os.cpu_count()} cores\n"
    )
    if args.profile:
        for name in args.models:
            print(f"## {name}")
            profile(MODELS[name], args.batch, args.steps)
        return
    rows = []
    for name in args.models:
        rows.append((name, measure(MODELS[name], args.batch, args.rounds, args.steps)))
        print(f"measured {name}", flush=True)
    for clock, key in (("CPU time of the process", "cpu_"), ("wall time", "")):
        print(
            f"\n**{clock}** per step\n\n"
            "| model | dense s/step | sparse_sup s/step | ratio | sparse_sup (grad mask only) ratio "
            "| torch.nn.utils.prune s/step | ratio | torch.ao WeightNormSparsifier s/step | ratio |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        for name, t in rows:
            d, s, g = t[key + "dense"], t[key + "sparse_sup"], t[key + "grad_mask"]
            p, a = t[key + "prune"], t[key + "ao_sparsifier"]
            print(
                f"| {name} | {d:.4f} | {s:.4f} | {s / d:.3f} | {g / d:.3f} | {p:.4f} | {p / d:.3f} "
                f"| {a:.4f} | {a / d:.3f} |"
            )
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the end")


if __name__ == "__main__":
    main()
