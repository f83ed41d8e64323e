"""``sparse-sup merge RUN_DIR --output DIR``: superpose a run's P and tickets again, alone or as a
collective job at any world size (``torchrun`` / ``accelerate launch``: the model is sharded with
FSDP2 over the processes). Settings the run fixed can be overridden to try variants without
retraining, e.g. ``--tickets.merge=ema --tickets.reprune=end --sparse.density=0.05``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HELP = "superpose a finished run's tickets again (any world size, settings overridable)"
ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("``", "'")
    parser.add_argument("run_dir", help="a run directory (holds config.yaml and tickets/)")
    parser.add_argument("--output", required=True, help="directory for the merged model (must be new)")
    parser.add_argument(
        "--tickets", default=None, help="comma-separated ticket numbers to merge (default: all), e.g. 2,3"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _error(text: str) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"error: {text}", file=sys.stderr, flush=True)
    return 2


def _validate(args) -> tuple[object, list[int] | None]:
    """The merge's config: the run's own, with the overrides; checked before anything is written."""
    from ..config import ConfigError, load_config

    run_dir, output = Path(args.run_dir), Path(args.output)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); pass the directory a run wrote")
    which = None
    if args.tickets:
        try:
            which = [int(x) for x in args.tickets.split(",")]
        except ValueError:
            raise ConfigError(f"--tickets {args.tickets!r}: give ticket numbers like 1,2,3") from None
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(
            f"--output {output} already holds files; choose a new directory or pass --overwrite to replace it"
        )
    if output.resolve() == run_dir.resolve() or run_dir.resolve() in output.resolve().parents:
        raise ConfigError(f"--output {output} must lie outside the run directory {run_dir}")
    config = load_config(
        saved, [*args.overrides, f"--experiment.output_dir={output}", "--experiment.overwrite=true"]
    )
    return config, which


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.run import checked_on_every_rank, finish_process, make_accelerator

    try:
        config, which = _validate(args)
    except ValueError as e:  # ConfigError from the checks, or a bad override
        return _error(str(e))
    accelerator = make_accelerator(config)
    from ..train.logs import setup_logging
    from ..train.merge import Merge
    from ..train.setup import prepare

    setup_logging(accelerator.process_index)
    merge = checked_on_every_rank(
        accelerator,
        lambda: Merge(prepare(config), Path(args.run_dir), Path(args.output), which),
        lambda text: print(f"error: {text}", file=sys.stderr, flush=True),
    )
    if merge is None:
        return finish_process(accelerator, 2)
    if args.overwrite and accelerator.is_main_process:
        shutil.rmtree(args.output, ignore_errors=True)
    accelerator.wait_for_everyone()
    merge.build(accelerator.num_processes)
    with torch.no_grad():
        summary = merge.run()
    if accelerator.is_main_process:
        rows = ["| model | accuracy | density |", "|---|---|---|"]
        for label, r in summary["results"].items():
            acc = "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%"
            dens = "-" if r.get("density") is None else f"{r['density']:.4f}"
            rows.append(f"| {label} | {acc} | {dens} |")
        print("\n".join(rows) + f"\n\nmerged model: {args.output}", flush=True)
    return finish_process(accelerator, 0)
