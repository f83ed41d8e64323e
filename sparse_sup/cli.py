"""Command line: ``sparse-sup`` / ``python train.py`` / launched by accelerate, torchrun or deepspeed.

    python train.py --config configs/debug-cpu.yaml --sparse.density=0.05 --tickets.num_cycles=2

The only argv reader of the package. Launcher flags (--local_rank, --deepspeed, ...) are accepted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug-cpu.yaml"
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="sparse-sup",
        description="Dynamic sparse training with Sup-tickets. Any config key can be overridden "
        "with --section.key=value (e.g. --sparse.density=0.05).",
    )
    parser.add_argument("--config", default=None, help="experiment YAML (default: configs/debug-cpu.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        default=None,
        help="DeepSpeed JSON (ZeRO stages: see README)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --section.key=value")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    from .config import config_to_dict, load_config

    config_path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    try:
        config = load_config(config_path, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    from .train.run import run_training

    def report(text: str) -> None:
        print(text, flush=True)

    def report_error(text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    return run_training(config, report, report_error, deepspeed_config=args.deepspeed)


if __name__ == "__main__":
    sys.exit(main())
