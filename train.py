"""Thin entry point: ``python train.py --config configs/<x>.yaml [--section.key=value ...]``."""

import sys

from sparse_sup.cli import main

if __name__ == "__main__":
    sys.exit(main(default="train"))  # python train.py --help lists the training options
