"""Command line: ``sparse-sup {train,merge,inspect,plot}``, ``python train.py``, ``python -m sparse_sup``;
also what accelerate, torchrun and deepspeed launch.

    python train.py --config configs/debug-cpu.yaml --sparse.density=0.05 --tickets.num_cycles=2
    sparse-sup inspect runs/debug-cpu-20260101-120000
    sparse-sup plot runs/debug-cpu-20260101-120000

The only argv reader of the package. Without a command, ``train`` runs (so ``sparse-sup --config x``
and ``python train.py --config x`` train as before). Each command lives in
``sparse_sup/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType

COMMANDS = ("train", "merge", "inspect", "plot")
DEFAULT_COMMAND = "train"
# launchers (deepspeed, torch.distributed.launch) put --local_rank=N before the script's own arguments
_LAUNCHER_FLAGS = ("--local_rank", "--local-rank")


def _command_modules() -> dict[str, ModuleType]:
    """The commands whose module exists (``merge`` arrives later), imported lazily: cheap modules."""
    modules = {}
    for name in COMMANDS:
        qualified = f"{__package__}.commands.{name}"
        if importlib.util.find_spec(qualified) is not None:
            modules[name] = importlib.import_module(qualified)
    return modules


def build_parser(modules: dict[str, ModuleType]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="sparse-sup",
        description="Dynamic sparse training with Sup-tickets. Without a command, 'train' runs: "
        "sparse-sup --config X is sparse-sup train --config X. 'sparse-sup COMMAND --help' lists a "
        "command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(modules) + "}")
    subparsers = {}
    for name, module in modules.items():
        subparsers[name] = sub.add_parser(name, help=getattr(module, "HELP", None))
        module.add_arguments(subparsers[name])
    return parser, subparsers


def _route(argv: list[str], commands: dict) -> list[str]:
    """Put the command first: launcher flags may precede it, and no command means ``train``."""
    launcher = [a for a in argv if a.split("=", 1)[0] in _LAUNCHER_FLAGS and "=" in a]
    rest = [a for a in argv if a not in launcher]
    if rest and rest[0] in commands:
        return [rest[0], *launcher, *rest[1:]]
    if rest and rest[0] in ("-h", "--help"):
        return rest
    return [DEFAULT_COMMAND, *launcher, *rest]


def main(argv: list[str] | None = None, default: str | None = None) -> int:
    """``default``: the command that also gets a bare ``--help`` (``train.py`` passes ``train``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = _command_modules()
    parser, subparsers = build_parser(modules)
    if default is not None and not any(a in modules for a in argv[:1]):
        argv = [default, *argv]
    args, rest = parser.parse_known_args(_route(argv, modules))
    module, subparser = modules[args.command], subparsers[args.command]
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        args.overrides = [a for a in rest if a.startswith("--") and "." in a.split("=", 1)[0]]
        unknown = [a for a in rest if a not in args.overrides]
        if unknown:
            subparser.error(f"unrecognised arguments {unknown}; overrides look like --section.key=value")
    elif rest:
        subparser.error(f"unrecognised arguments {rest}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
