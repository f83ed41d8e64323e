"""Run a whole experiment: validate, then train, then print the summary (rank 0)."""

from __future__ import annotations

import gc
import os
import sys

import torch

from ..config import Config


def run_training(config: Config) -> int:
    from accelerate import Accelerator

    from .loop import Run, summary_table
    from .setup import prepare

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.train.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    try:
        prepared = prepare(config)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return _exit(accelerator, 2)
    run = Run(prepared, accelerator)
    run.start()
    summary = run.train()
    if accelerator.is_main_process:
        print()
        plan = summary["plan"]
        print(
            f"Sup-tickets on {config.model.name}, {config.sparse.method}, density {config.sparse.density}, "
            f"{plan['num_cycles']} tickets ({100 * plan['cycles_fraction']:.0f}% of the budget in cycles), "
            f"world size {summary['world_size']}"
        )
        print(summary_table(summary))
        print(f"\nrun directory: {prepared.run_dir}")
    return _exit(accelerator, 0)


def _exit(accelerator, code: int) -> int:
    """Finish distributed runs cleanly (gloo workers can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
