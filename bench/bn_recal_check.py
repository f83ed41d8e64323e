"""Does BN recalibration preserve a ticket's accuracy? (CPU, one process)

A ticket's BN statistics come from training (running averages over augmented micro-batches). A
recalibration procedure that matches what the layers saw in training should leave the ticket's
accuracy where it was; the superposed models S_i are recalibrated with the same procedure, so a
procedure that costs a ticket accuracy costs every S_i the same.

For a finished run, this loads ticket T_i (``tickets/T_<i>``, or ``tickets/ticket_<i>.pt`` of older
runs) into the run's model and reports the test
accuracy of the ticket as trained, then after recalibrating its BN statistics (a) on batches drawn
through the training transform (the default, ``tickets.bn_recal_augment=true``) and (b) on clean
training images (``tickets.bn_recal_augment=false``) — with the run's own batch size, number of
batches and counter (``--counter``, default: the ticket number, as S_i's pass uses).

Usage: PYTHONPATH=. python bench/bn_recal_check.py runs/<run> [--ticket 3] [--batches N|all]
       [--out bench/bn_recal_check.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
from pathlib import Path

import torch

from sparse_sup.checkpoint import load_sharded, load_verified
from sparse_sup.config import load_config
from sparse_sup.core.collectives import LOCAL
from sparse_sup.core.names import normalize_name
from sparse_sup.tickets import recalibrate_batchnorm
from sparse_sup.train.evaluate import evaluate, recalibration_batches
from sparse_sup.train.setup import prepare


def load_ticket(run_dir: Path, index: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of ticket T_index: a sharded checkpoint, or the whole-tensor file of older runs."""
    old = run_dir / "tickets" / f"ticket_{index}.pt"
    if old.exists():
        return load_verified(old)["model"]
    loaded = load_sharded(run_dir / "tickets" / f"T_{index}")
    return {k: loaded[normalize_name(k)][0].view_as(v) for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ticket", type=int, default=None, help="ticket number (default: the last)")
    parser.add_argument("--counter", type=int, default=None, help="recalibration counter (default: ticket)")
    parser.add_argument("--batches", default=None, help="number of BN batches or 'all' (default: the run's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    config = load_config(args.run_dir / "config.yaml", ["--experiment.overwrite=true"])
    ticket = args.ticket or config.tickets.num_cycles
    counter = ticket if args.counter is None else args.counter
    num_batches = config.tickets.bn_recal_batches
    if args.batches is not None:
        num_batches = None if args.batches == "all" else int(args.batches)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prepared = prepare(config)  # validates and builds model/data; writes nothing
    model = prepared.model
    model.load_state_dict(load_ticket(args.run_dir, ticket, model))
    cpu, d = torch.device("cpu"), config.data

    def accuracy(m: torch.nn.Module) -> float:
        return 100 * evaluate(m, prepared.eval_set, d.eval_batch_size, LOCAL, cpu)["accuracy"]

    clean = copy.copy(prepared.train_set)
    clean.train = False
    rows = [("as trained (running stats from training)", accuracy(model))]
    for label, dataset in (("training transform (default)", prepared.train_set), ("clean images", clean)):
        m = copy.deepcopy(model)
        batches = recalibration_batches(
            dataset,
            d.eval_batch_size,
            num_batches,
            config.experiment.seed,
            LOCAL,
            cpu,
            torch.float32,
            counter=counter,
        )
        recalibrate_batchnorm(m, batches)
        rows.append((f"recalibrated on {label}", accuracy(m)))

    used = "one pass" if num_batches is None else f"{num_batches} batches"
    lines = [
        f"T_{ticket} of `{args.run_dir}` ({config.model.name}, {config.sparse.method}, density "
        f"{config.sparse.density}); BN recalibration: batch {d.eval_batch_size}, {used}, counter {counter}; "
        f"{datetime.date.today()}",
        "",
        "| BN statistics | test accuracy (%) | change (points) |",
        "|---|---|---|",
    ]
    base = rows[0][1]
    lines += [f"| {label} | {acc:.2f} | {acc - base:+.2f} |" for label, acc in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
