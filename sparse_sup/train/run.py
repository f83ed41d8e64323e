"""Run a whole experiment: validate, then train, then hand the summary to the caller (rank 0).

Distributed runs end here with ``os._exit`` (gloo workers can abort at interpreter exit), so the
caller passes ``report`` / ``report_error`` callbacks instead of printing afterwards."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, check_batch_split

T = TypeVar("T")


def run_training(
    config: Config,
    report: Callable[[str], None],
    report_error: Callable[[str], None],
    deepspeed_config: str | None = None,
    resume: str | None = None,
) -> int:
    """Returns the exit code. ``deepspeed_config``: the JSON given to the ``deepspeed`` launcher;
    ``resume``: ``auto`` or a run/checkpoint path to continue from."""
    from ..progress import configure as configure_progress
    from ..results import describe_tickets, summary_table
    from .loop import Run
    from .setup import prepare
    from .tracking import resolve_report_to

    accelerator = make_accelerator(config, deepspeed_launcher=bool(deepspeed_config))

    def check_input():
        check_batch_split(config.schedule, accelerator.num_processes)
        if deepspeed_config or accelerator.state.deepspeed_plugin is not None:
            check_deepspeed_precision(config)
        prepared = prepare(config, resume)
        resolve_report_to(config.train.report_to)  # a tracker that is not installed stops here
        from ..backends.detect import detect_parallelism
        from .wrap import check_wrap_options

        parallelism = detect_parallelism(accelerator, deepspeed_launcher=bool(deepspeed_config))
        check_wrap_options(config, parallelism, accelerator.num_processes)
        from ..backends.deepspeed_config import fill_deepspeed_config

        if deepspeed_config:
            prepared.deepspeed_config = fill_deepspeed_config(
                deepspeed_config, config, accelerator.num_processes
            )
        elif accelerator.state.deepspeed_plugin is not None:  # Accelerate cannot infer "auto" without
            plugin = accelerator.state.deepspeed_plugin  # prepared data loaders: fill it from our config
            fill_deepspeed_config(plugin.deepspeed_config, config, accelerator.num_processes)
        return prepared

    prepared = checked_on_every_rank(accelerator, check_input, report_error)
    if prepared is None:
        return finish_process(accelerator, 2)
    configure_progress(config.train.progress_bar and accelerator.is_main_process)
    run = Run(prepared, accelerator)
    run.start()
    summary = run.train()
    if accelerator.is_main_process:
        from ..report import write_run_report

        write_run_report(prepared.run_dir, command=sys.argv)  # plots + report.md; logs its own failure
        plan = summary["plan"]
        report(
            f"\nSup-tickets on {config.model.name}, {config.sparse.method}, density {config.sparse.density}, "
            f"{describe_tickets(plan)}, "
            f"world size {summary['world_size']}\n{summary_table(summary)}\n"
            f"\nrun directory: {prepared.run_dir}"
        )
    return finish_process(accelerator, 0)


BAD_INPUT = (ConfigError, CheckpointError, FileNotFoundError)  # said as one line; anything else is a bug


def checked_on_every_rank(
    accelerator, check: Callable[[], T], report_error: Callable[[str], None]
) -> T | None:
    """Run the input checks on every rank, then decide together.

    Every rank passes here before any rank writes: a rank slower to check must not find the run
    directory that a faster rank has already started (it would refuse it as "already holds a run").
    And one rank's refusal stops every rank, instead of leaving the others waiting in their next
    collective while the refusing rank waits in its exit barrier. Returns ``check()``'s result, or
    None when any rank refused; the refusal is said once, by the first rank that made it."""
    try:
        result, error = check(), None
    except BAD_INPUT as e:
        result, error = None, e
    refused = refusing_ranks(accelerator, error is not None)
    if not refused:
        return result
    if accelerator.process_index == refused[0]:
        report_error(
            str(error) if refused[0] == 0 else f"rank {refused[0]} of {accelerator.num_processes}: {error}"
        )
    return None


def refusing_ranks(accelerator, refused: bool) -> list[int]:
    """The ranks that refused, known to every rank (one all-reduce over the job's process group)."""
    if accelerator.num_processes == 1:
        return [0] if refused else []
    import torch.distributed as dist

    flags = torch.zeros(accelerator.num_processes, device=accelerator.device)
    flags[accelerator.process_index] = float(refused)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def check_deepspeed_precision(config: Config) -> None:
    """DeepSpeed has no fp16 on CPU: its engine refuses it in ``deepspeed.initialize`` ("Type fp16 is
    not supported on your device"), after the data and the model were built. Refused here instead,
    before anything is written, saying what runs (the loop's own CPU fp16 path, autocast and a
    GradScaler, is for one process and DDP, never around DeepSpeed's engine)."""
    if config.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision='fp16' under DeepSpeed on CPU: DeepSpeed runs fp16 on GPUs only (its engine "
            "refuses it: 'Type fp16 is not supported on your device'); use train.precision=bf16 (DeepSpeed's "
            "bf16 runs on CPU) or fp32, or fp16 without DeepSpeed (one process or DDP)"
        )


def make_accelerator(config: Config, deepspeed_launcher: bool = False):
    """The Accelerator for this launch (process group, device, mixed precision)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.train.precision]
    cpu = not torch.cuda.is_available()
    if deepspeed_launcher:  # the deepspeed launcher: DeepSpeed owns the model, Accelerate only devices
        import deepspeed

        single_process_environment()
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
        return Accelerator(cpu=cpu)
    # Accelerate's DeepSpeed plugin on CPU needs gloo and must not be forced onto its CPU path
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and use_deepspeed else []
    return Accelerator(
        mixed_precision=None if use_deepspeed else mixed,
        cpu=cpu and not use_deepspeed,
        kwargs_handlers=handlers,
    )


def single_process_environment() -> bool:
    """``--deepspeed`` without a launcher (``python train.py --deepspeed ...``): describe a 1-process
    job in the environment, as the ``deepspeed`` launcher would, so DeepSpeed does not go looking for
    MPI. Returns True if it did (a launcher sets ``RANK`` and ``WORLD_SIZE`` itself)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    import logging
    import socket

    with socket.socket() as s:  # a free port for the (1-process) rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
    ).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))
    logging.getLogger(__name__).info(
        "--deepspeed without a launcher: running DeepSpeed as 1 process; for N GPUs or processes use "
        "deepspeed --num_gpus N train.py --deepspeed ..."
    )
    return True


def finish_process(accelerator, code: int) -> int:
    """Finish distributed runs cleanly (gloo workers can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
