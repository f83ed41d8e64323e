"""``sparse-sup train`` (also ``sparse-sup`` and ``python train.py`` without a subcommand): one run.

    sparse-sup train --config configs/debug-cpu.yaml --sparse.density=0.05 --tickets.num_cycles=2

Launcher flags (--local_rank, --deepspeed) are accepted; any config key is overridden with
``--section.key=value``."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a model (the default when no command is given)"
ACCEPTS_OVERRIDES = True
DEFAULT_CONFIG = "debug-cpu"  # a preset name: configs/debug-cpu.yaml, shipped in the wheel too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Dynamic sparse training with Sup-tickets. Any config key can be overridden "
        "with --section.key=value (e.g. --sparse.density=0.05)."
    )
    parser.add_argument(
        "--config", default=None, help="experiment YAML, or a preset name such as debug-cpu (the default)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        default=None,
        help="DeepSpeed JSON (ZeRO stages: see README)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue a run: 'auto' = newest complete checkpoint of experiment.output_dir (a fresh "
        "start if there is none), or a run directory / checkpoint directory",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, config_to_dict, load_config

    config_path = args.config or DEFAULT_CONFIG
    if args.resume and args.resume != "auto" and not args.config:
        from ..train.resume import run_dir_of

        saved = run_dir_of(args.resume, None) / "config.yaml"  # the run's own config
        config_path = saved if saved.is_file() else config_path
    try:
        config = load_config(config_path, args.overrides)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank gets here: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    from ..train.run import run_training

    def report(text: str) -> None:
        print(text, flush=True)

    def report_error(text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    return run_training(config, report, report_error, deepspeed_config=args.deepspeed, resume=args.resume)
