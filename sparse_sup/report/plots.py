"""The pictures of a run, one figure per question, from its run directory alone (matplotlib, Agg).

- ``lr.png``: what learning rate did each step use? Phase 1, the cycles, where each ticket was taken.
- ``loss_accuracy.png``: how did training go, and how good were P, each ticket T_i and each S_i?
- ``layer_density.png``: where are the weights? ERK's initial allocation, the mask at P, the final S_M.
- ``exploration.png``: is the mask still moving? Share of weights ever active (in-time
  over-parameterisation) and the share swapped at each topology update.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from .data import RunData, load_run  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100
WIDE = (11, 4.5)  # inches: 1100 x 450 px
TALL = (11, 7)  # two panels sharing the step axis: 1100 x 700 px
PLOT_DIR = "plots"
CYCLE_SHADES = ("#f5e9cc", "#e9dcb8")
COLORS = {"P": "#1f77b4", "T": "#d62728", "S": "#2ca02c", "final": "black", "init": "#7f7f7f"}


def _phases(ax, run: RunData, label_tickets: bool = True, in_legend: bool = True) -> None:
    """Shade the cycles (alternating), draw the end of phase 1 (P) and a dotted line at every ticket."""
    for m, (start, end) in enumerate(run.cycles()):
        ax.axvspan(
            start,
            end,
            color=CYCLE_SHADES[m % 2],
            lw=0,
            label="ticket cycles (phase 2)" if m == 0 and in_legend else None,
        )
    if run.pre_steps is not None:
        ax.axvline(
            run.pre_steps,
            color=COLORS["P"],
            ls="--",
            lw=1.2,
            label="P: end of phase 1" if in_legend else None,
        )
    for i, r in run.tickets("T"):
        label = "ticket T_i taken" if i == 1 and in_legend else None
        ax.axvline(r["step"], color=COLORS["T"], ls=":", lw=1.0, label=label)
        if label_tickets:
            ax.annotate(
                f"T_{i}",
                (r["step"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(-2, -2),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize=8,
                color=COLORS["T"],
            )


def _end_step(run: RunData) -> int | None:
    """The last step of the run (planned, or completed when the run stopped early)."""
    if run.summary:
        return run.summary["steps_completed"]
    return (run.schedule or {}).get("total_steps")


def _legend(ax) -> None:
    """Outside the axes, on the right: never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_lr(run: RunData, path: Path) -> Path | None:
    schedule = run.schedule
    train = run.events("train")
    if schedule is None and not train:
        return None
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    _phases(ax, run)
    if schedule is not None:
        ax.plot(  # the last step's LR held until the end of the run
            [*schedule["lr_steps"], schedule["total_steps"]],
            [*schedule["lr"], schedule["lr"][-1]],
            color="#333333",
            lw=1.3,
            drawstyle="steps-post",  # step s uses its LR over [s, s + 1)
            label="learning rate",
        )
    else:  # runs written before the schedule record: the logged points only
        ax.plot(
            [r["step"] for r in train], [r["lr"] for r in train], "o-", ms=2, label="learning rate (logged)"
        )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title(f"{run.name}: learning rate, phase 1 and the ticket cycles")
    ax.set_xlim(left=0)
    _legend(ax)
    return _save(fig, path)


def _accuracy_points(ax, run: RunData, labels: bool) -> None:
    """Periodic evaluations, P, every T_i and S_i (test accuracy in %), optionally labelled."""
    evals = run.evals()
    periodic = sorted((r["step"], 100 * r["accuracy"]) for k, r in evals.items() if k.startswith("step_"))
    if periodic:
        ax.plot(*zip(*periodic), "o-", color="#999999", ms=3, lw=1, label="periodic evaluation")
    if "P" in evals:
        p = evals["P"]
        ax.plot(p["step"], 100 * p["accuracy"], "*", color=COLORS["P"], ms=14, label="P")
        if labels:
            ax.annotate(
                f"P {100 * p['accuracy']:.1f}%",
                (p["step"], 100 * p["accuracy"]),
                xytext=(0, 11),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color=COLORS["P"],
            )
    for kind, marker, dy in (("T", "o", -14), ("S", "D", 9)):  # T_i below its point, S_i above
        points = run.tickets(kind)
        if not points:
            continue
        steps = [r["step"] for _, r in points]
        accs = [100 * r["accuracy"] for _, r in points]
        ax.plot(steps, accs, marker, color=COLORS[kind], ms=8, label=f"{kind}_i")
        if labels:
            for (i, _), x, y in zip(points, steps, accs):
                ax.annotate(
                    f"{kind}_{i} {y:.1f}%",
                    (x, y),
                    xytext=(0, dy),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    color=COLORS[kind],
                )


def plot_loss_accuracy(run: RunData, path: Path) -> Path | None:
    """Loss over the run (top); test accuracy over the run (bottom left) and, zoomed on the
    cycles where the tickets are taken, P, every T_i and every S_i with their accuracy."""
    train = run.events("train")
    if not train and not run.evals():
        return None
    fig = plt.figure(figsize=TALL, layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 2))
    top = fig.add_subplot(grid[0, :])
    whole = fig.add_subplot(grid[1, 0], sharex=top)
    zoom = fig.add_subplot(grid[1, 1])
    _phases(top, run)
    if train:
        top.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            color="#333333",
            lw=1.2,
            label="training loss",
        )
    top.set_ylabel("training loss\n(mean over the log window)")
    top.set_title(f"{run.name}: loss and test accuracy; P, every ticket T_i and every superposition S_i")
    top.set_xlim(0, _end_step(run))
    _legend(top)

    _phases(whole, run, label_tickets=False, in_legend=False)
    _accuracy_points(whole, run, labels=False)
    whole.set_xlabel("optimizer step")
    whole.set_ylabel("test accuracy (%)")
    whole.margins(y=0.2)
    if whole.get_legend_handles_labels()[0]:
        whole.legend(fontsize=8, loc="best")

    _phases(zoom, run, label_tickets=False, in_legend=False)
    _accuracy_points(zoom, run, labels=True)
    cycles, end = run.cycles(), _end_step(run)
    if cycles and end:
        width = cycles[0][1] - cycles[0][0]
        lo, hi = cycles[0][0] - 0.8 * width, end + 0.5 * width
        zoom.set_xlim(lo, hi)
        shown = [100 * r["accuracy"] for r in run.evals().values() if lo <= r["step"] <= hi]
        if shown:  # the zoom's own accuracy range, with room for the labels
            pad = max(0.5, 0.35 * (max(shown) - min(shown)))
            zoom.set_ylim(min(shown) - pad, max(shown) + pad)
    zoom.set_xlabel("optimizer step")
    zoom.set_ylabel("test accuracy (%)")
    zoom.set_title("zoom on the ticket cycles", fontsize=10)
    return _save(fig, path)


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def plot_layer_density(run: RunData, path: Path) -> Path | None:
    series = [
        ("init", "initial allocation", COLORS["init"], "o"),
        ("P", "training mask at P", COLORS["P"], "s"),
        ("final", "final model (S_M)", COLORS["S"], "D"),
    ]
    found = [(run.masks(key), label, color, marker) for key, label, color, marker in series]
    found = [f for f in found if f[0]]
    if not found:
        return None
    layers = list(found[0][0])
    width = min(20.0, max(WIDE[0], 0.25 * len(layers)))
    fig, ax = plt.subplots(figsize=(width, 6), layout="constrained")
    x = list(range(len(layers)))
    for densities, label, color, marker in found:
        y = [densities.get(n, float("nan")) for n in layers]
        if label == "initial allocation":  # bars: P's mask often equals it (SET, RigL keep layer counts)
            dist = run.config.get("sparse", {}).get("distribution", "")
            ax.bar(x, y, width=0.7, color="#d9d9d9", edgecolor="#9a9a9a", label=f"{label} {dist}".strip())
        else:
            ax.plot(x, y, marker=marker, ms=5, lw=1, color=color, label=label)
    target = run.config.get("sparse", {}).get("density")
    if target:
        ax.axhline(target, color="black", ls="--", lw=0.8, label=f"overall target density {target}")
    ax.set_yscale("log")
    ax.set_ylim(top=1.3)
    ax.set_xticks(x, [_short(n) for n in layers], rotation=90, fontsize=7 if len(layers) < 40 else 5)
    ax.set_xlabel("layer (sparsified weight)")
    ax.set_ylabel("density (fraction kept, log scale)")
    ax.set_title(f"{run.name}: per-layer density at initialisation, at P and in the final model")
    ax.grid(axis="y", which="both", alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_exploration(run: RunData, path: Path) -> Path | None:
    updates = run.events("update", "reexplore", "prune")
    if not updates:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=TALL, sharex=True, layout="constrained")
    _phases(top, run)
    itop = [(r["step"], 100 * r["itop_rate"]) for r in updates if "itop_rate" in r]
    if itop:
        init = run.masks("init")
        start = run.events("masks")[0].get("density") if init else None
        points = ([(0, 100 * start)] if start else []) + itop
        end = _end_step(run)
        if end and end > points[-1][0]:
            points.append((end, points[-1][1]))  # unchanged until the end of the run
        top.step(*zip(*points), where="post", color="#9467bd", lw=1.5, label="weights ever active")
    top.set_ylabel("share of target weights\never active (%)")
    top.set_title(f"{run.name}: exploration (in-time over-parameterisation) and mask change per update")
    _legend(top)
    top.set_ylim(0, top.get_ylim()[1] * 1.12)  # headroom for the ticket labels

    _phases(bottom, run, label_tickets=False, in_legend=False)
    for kind, color, marker in (
        ("update", "#1f77b4", "o"),
        ("reexplore", "#ff7f0e", "^"),
        ("prune", "#8c564b", "v"),
    ):
        points = [
            (r["step"], 100 * r["mask_change"]) for r in updates if r["event"] == kind and "mask_change" in r
        ]
        if points:
            bottom.plot(*zip(*points), marker, color=color, ms=5, label=f"{kind}")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("active weights swapped\nby the update (%)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlim(left=0)
    _legend(bottom)
    return _save(fig, path)


PLOTS = {
    "lr.png": plot_lr,
    "loss_accuracy.png": plot_loss_accuracy,
    "layer_density.png": plot_layer_density,
    "exploration.png": plot_exploration,
}


def make_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every figure the run's records allow; returns the paths written."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / PLOT_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        path = plot(run, out / name)
        if path is None:
            log.info("%s: nothing recorded for it, skipped", name)
        else:
            written.append(path)
    return written
