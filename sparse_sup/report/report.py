"""``report.md`` in the run directory: results table, checks that catch silent failures, the plots,
the exact command and the resolved config. Written by rank 0 at the end of every run."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from ..results import describe_tickets
from .data import RunData, load_run
from .plots import PLOT_DIR, make_plots

log = logging.getLogger(__name__)

CAPTIONS = {
    "lr.png": "Learning rate per step: phase 1, the ticket cycles (shaded), where each ticket was taken.",
    "loss_accuracy.png": "Training loss and test accuracy, with P, every ticket T_i and every S_i.",
    "layer_density.png": "Per-layer density: initial allocation, the training mask at P, the final S_M.",
    "exploration.png": "Share of target weights ever active; share of active weights each update swapped.",
}


def results_table(run: RunData) -> str:
    """Every evaluated model (P, T_i, S_i, final), with the change against P."""
    rows = ["| model | accuracy | vs P (points) | loss | density | step |", "|---|---|---|---|---|---|"]
    if run.summary:  # includes the final model's evaluation
        evals = run.summary["results"]
    else:
        evals = {k: v for k, v in run.evals().items() if not k.startswith("step_")}
    p = evals.get("P")
    final_is = (run.summary or {}).get("final_is", "")
    for label, r in evals.items():
        name = f"final = {final_is}" if label == "final" and final_is else label
        delta = f"{100 * (r['accuracy'] - p['accuracy']):+.2f}" if p and label != "P" else ""
        rows.append(
            f"| {name} | {100 * r['accuracy']:.2f}% | {delta} | {r['loss']:.4f} | {r['density']:.4f} "
            f"| {r['step']} |"
        )
    return "\n".join(rows)


def checks(run: RunData) -> list[str]:
    """Plain-language warnings about what sparse training hides: empty layers, a frozen mask,
    tickets getting worse, a superposition below its tickets."""
    notes = []
    final = run.masks("final") or {}
    empty = [name for name, d in final.items() if d == 0]
    if empty:
        notes.append(f"{len(empty)} layer(s) have no weight left in the final model: {', '.join(empty[:5])}")
    updates = [r for r in run.events("update") if "mask_change" in r]
    if updates and updates[-1]["mask_change"] == 0:
        notes.append(
            f"the last topology update (step {updates[-1]['step']}) changed no weight: the mask froze"
        )
    tickets = run.tickets("T")
    for (i, a), (j, b) in zip(tickets, tickets[1:]):
        if b["accuracy"] < a["accuracy"]:
            notes.append(f"T_{j} ({100 * b['accuracy']:.2f}%) is below T_{i} ({100 * a['accuracy']:.2f}%)")
    verdict = superposition_verdict(run)
    if verdict:
        notes.append(verdict)
    if run.summary is None:
        notes.append("no summary.json: the run did not finish")
    return notes


def superposition_verdict(run: RunData) -> str | None:
    """Did the superposition help? S_M against P and the best ticket, with the standard error of one
    accuracy on this test set, so that a difference inside it is not read as a result."""
    supers, tickets, p = run.tickets("S"), run.tickets("T"), run.evals().get("P")
    if not supers or not tickets or p is None:
        return None
    (last_i, last), (best_i, best) = supers[-1], max(tickets, key=lambda x: x[1]["accuracy"])
    gain_p, gain_t = 100 * (last["accuracy"] - p["accuracy"]), 100 * (last["accuracy"] - best["accuracy"])
    count = last.get("count")
    noise = (
        f"; one accuracy on {count} test images has a standard error of "
        f"{100 * (last['accuracy'] * (1 - last['accuracy']) / count) ** 0.5:.2f} points"
        if count
        else ""
    )
    head = (
        f"S_{last_i} {100 * last['accuracy']:.2f}% is {gain_p:+.2f} points against P and {gain_t:+.2f} "
        f"against the best ticket T_{best_i}"
    )
    if gain_p >= 0 and gain_t >= 0:
        return f"{head}: the superposition helped{noise}"
    lost = "P" if gain_p < 0 else f"the best ticket T_{best_i}"
    return f"{head}: the superposition lost accuracy against {lost}{noise}"


def format_command(argv: list[str]) -> str:
    """``python train.py ...`` or ``sparse-sup ...`` as it was typed (quoted for a shell)."""
    if not argv:
        return ""
    head = os.path.basename(argv[0])
    if head == "__main__.py":  # python -m sparse_sup
        words = ["python", "-m", os.path.basename(os.path.dirname(argv[0]))]
    else:
        words = ["python", argv[0]] if head.endswith(".py") else [head]
    return shlex.join([*words, *argv[1:]])


def write_report(run_dir: str | Path, command: list[str] | None = None) -> Path:
    """Plots into ``run_dir/plots`` and ``run_dir/report.md``; returns the report's path."""
    run_dir = Path(run_dir)
    plots = make_plots(run_dir)
    run = load_run(run_dir)
    s = run.summary or {}
    lines = [f"# Run report: {run.name}", ""]
    if s:
        plan = s["plan"]
        lines += [
            f"{s['model']}, {s['method']}, density {s['density']}, {describe_tickets(plan)} of "
            f"{plan['total_steps']} steps, "
            f"{s['parallelism']} over {s['world_size']} process(es); {s['steps_completed']} steps completed"
            + (f", {s['skipped_steps']} skipped" if s.get("skipped_steps") else "")
            + ".",
            "",
        ]
    lines += ["## Results", "", results_table(run), ""]
    notes = checks(run)
    lines += ["## Checks", ""]
    lines += (
        [f"- {n}" for n in notes] if notes else ["- nothing unusual: no empty layer, the mask kept moving"]
    )
    lines += ["", "## Plots", ""]
    for path in plots:
        lines += [f"![{path.stem}]({PLOT_DIR}/{path.name})", "", CAPTIONS.get(path.name, ""), ""]
    if command:
        lines += ["## Command", "", "```bash", format_command(command), "```", ""]
    config = run_dir / "config.yaml"
    if config.is_file():
        lines += ["## Config (resolved)", "", "```yaml", config.read_text().rstrip(), "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def write_run_report(run_dir: str | Path, command: list[str] | None = None) -> Path | None:
    """``write_report`` at the end of a run: a failure is logged, not raised (the run's results are
    already on disk; ``sparse-sup plot`` can redraw the pictures)."""
    try:
        path = write_report(run_dir, command)
    except Exception:
        log.exception("could not write the run report in %s", run_dir)
        return None
    log.info("report: %s", path)
    return path
