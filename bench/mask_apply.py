"""Cost of applying masks: multiplication (keeps inf/NaN: 0 * nan = nan) vs. fill semantics.

Measured: wall time of zeroing the masked positions of every target weight of a model (ResNet-18
by default: 21 conv/linear weights, 11.2M values, ERK masks at density 0.1), fp32, for

* foreach_mul   -- ``torch._foreach_mul_(params, masks)`` (the old way; NaN/inf survive);
* masked_fill   -- ``p.masked_fill_(~m, 0)`` per tensor, the mask inverted on the fly;
* where         -- ``torch.where(m, p, p.new_zeros(()), out=p)`` per tensor (sparse_sup until
                   2026-12-03);
* int_bits_mul  -- ``p.view(torch.int32).mul_(m)`` per tensor: the float's bits times the 0/1 mask;
* sparse_sup    -- ``MaskState.apply_to_weights`` as the engine calls it after every step.

Variants run side by side in rotating order (other processes may share the CPU); the table shows the
median over ``--rounds`` rounds of the mean over ``--reps`` calls.

Usage: PYTHONPATH=. python bench/mask_apply.py [--model resnet18] [--rounds 7] [--reps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch

from sparse_sup.core.masks import MaskState
from sparse_sup.core.targets import Target, whole_tensor_target
from sparse_sup.models import build_model, select_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, 10)
    params = dict(model.named_parameters())
    names = select_targets(model)
    state = MaskState.initialize([whole_tensor_target(n, params[n], None) for n in names], 0.1, "erk", seed=0)
    ms = [state.masks[n] for n in names]

    def variants(ps: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
        targets = [Target(n, p, tuple(p.shape)) for n, p in zip(names, ps)]
        return {
            "foreach_mul": lambda: torch._foreach_mul_(ps, ms),
            "masked_fill": lambda: [p.masked_fill_(~m, 0) for p, m in zip(ps, ms)],
            "where": lambda: [torch.where(m, p, p.new_zeros(()), out=p) for p, m in zip(ps, ms)],
            "int_bits_mul": lambda: [p.view(torch.int32).mul_(m) for p, m in zip(ps, ms)],
            "sparse_sup": lambda: state.apply_to_weights(targets),
        }

    ps = [params[n].detach() for n in names]
    timed = variants(ps)
    for fn in timed.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in timed}
    keys = list(timed)
    for r in range(args.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            for _ in range(args.reps):
                timed[k]()
            times[k].append((time.perf_counter() - start) / args.reps)
    numel = sum(p.numel() for p in ps)
    base = statistics.median(times["foreach_mul"])
    lines = [
        f"{args.model}: {len(ps)} targets, {numel / 1e6:.1f}M values, {args.threads} threads, "
        f"torch {torch.__version__}, {datetime.date.today()}",
        "",
        "| variant | ms per call (median) | ratio to foreach_mul | masked NaN/inf become 0 |",
        "|---|---|---|---|",
    ]
    for k in keys:
        poisoned = [torch.full_like(p, float("nan")) for p in ps]
        poisoned[0].fill_(float("inf"))
        variants(poisoned)[k]()
        zeroes = all(bool((p[~m] == 0).all()) for p, m in zip(poisoned, ms))
        med = statistics.median(times[k])
        lines.append(f"| {k} | {1e3 * med:.2f} | {med / base:.2f} | {'yes' if zeroes else 'no'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
