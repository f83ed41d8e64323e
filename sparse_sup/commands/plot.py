"""``sparse-sup plot RUN_DIR``: the run's pictures as PNGs (LR and phases, loss and accuracy with P,
T_i and S_i, per-layer density, exploration), from its run directory alone."""

from __future__ import annotations

import argparse
import sys

HELP = "draw a run's plots (PNG) from its run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write lr.png, loss_accuracy.png, layer_density.png and exploration.png for a run "
        "(from metrics.jsonl, summary.json and config.yaml). Works on a run that is still going."
    )
    parser.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from ..report import make_plots

    try:
        paths = make_plots(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
