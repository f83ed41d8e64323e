"""Cost of a topology update and of a superposition, as a fraction of the training between them (CPU).

Measured inside the real training loop (``sparse_sup.train.loop.Run``, as ``python train.py``
builds it), RigL and SET at density 0.1 (ERK), batch 128, one torch thread, bundled CIFAR-10:

* **step**    -- one ordinary optimizer step of the loop (data, forward, backward, masks, optimizer,
                 logging): median over the steps without a mask event;
* **update**  -- one topology update, all layers: the engine's mask-event call after the optimizer
                 step (drop by |w|, regrow by |gradient| for RigL or hashed random keys for SET,
                 masks / weights / momentum committed, the loop's hook: log line, per-layer
                 densities in metrics.jsonl) plus, for RigL, the extra cost of keeping the dense
                 gradient scores in ``before_optimizer_step`` on the step before it;
* **superposition** -- what one ticket adds to the side chain: merge (CAA average over every
                 floating tensor), global magnitude re-prune to floor(d N), swap into the model,
                 BatchNorm recalibration through the loop's own ``Recorder.recalibrate_bn`` (the
                 config's ``tickets.bn_recal_batches`` batches of ``data.eval_batch_size``), swap back.
                 Evaluating and saving tickets is not included (that is reporting, not the method).

The loop runs with ``sparse.update_interval=2`` so that several updates happen within a few steps
(an update's cost does not depend on ΔT); fractions are then computed for ΔT = 1000 (the recipes)
and for the CPU presets' ΔT (``configs/debug-cpu.yaml``: 50), and for the superposition against a
cycle of the debug preset and against 1000 steps. Times are CPU seconds of the main thread (one
torch thread: every op runs there), so other processes on a shared machine do not inflate them;
wall seconds are shown beside them. Goal: update <= 0.5% of the training between updates at ΔT = 1000.

Usage: python bench/topology_cost.py [--models resnet32_cifar resnet18] [--updates 4] [--smoke]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODELS, Stop, hook_run, load_line, sparse_sup_run  # noqa: E402

from sparse_sup.tickets import SuperpositionChain  # noqa: E402

PRESET_INTERVAL = 50  # configs/debug-cpu.yaml sparse.update_interval
PRESET_CYCLE_STEPS = 39  # configs/debug-cpu.yaml: 780 steps, 15% in 3 cycles


class Clock:
    """Accumulates (CPU, wall) seconds of timed calls."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def wrap(self, fn):
        def timed(*args, **kwargs):
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu.append(time.thread_time() - c0)
                self.wall.append(time.perf_counter() - w0)

        return timed

    def median(self) -> tuple[float, float]:
        return statistics.median(self.cpu), statistics.median(self.wall)


def measure(model: str, method: str, args: argparse.Namespace, tmp: Path) -> dict[str, tuple[float, float]]:
    run = sparse_sup_run(
        model,
        0.1,
        args.batch,
        tmp / f"{model}-{method}",
        [*args.extra, f"--sparse.method={method}", "--sparse.update_interval=2"],
    )
    logging.getLogger("sparse_sup").setLevel(logging.WARNING)
    engine = run.engine
    events, before = Clock(), {True: Clock(), False: Clock()}
    inner_events, inner_before = engine._apply_mask_events, engine.before_optimizer_step
    engine._apply_mask_events = events.wrap(inner_events)

    def timed_before() -> None:  # split by whether an update is due after this step
        due = "update" in engine.timeline.mask_events(engine.step + 1)
        before[due].wrap(inner_before)()

    engine.before_optimizer_step = timed_before
    steps: list[tuple[float, float, bool]] = []
    state = {"c": 0.0, "w": 0.0, "n": 0, "event": False}

    def hook() -> None:  # start of every step: close the previous step's window
        c, w = time.thread_time(), time.perf_counter()
        if state["n"]:
            steps.append((c - state["c"], w - state["w"], state["event"]))
        state["event"] = bool(engine.timeline.mask_events(engine.step + 1))
        if state["n"] > 2 * args.updates + 1:
            raise Stop
        state["n"] += 1
        state["c"], state["w"] = time.thread_time(), time.perf_counter()

    hook_run(run, hook)
    try:
        run.train()
    except Stop:
        pass
    plain = [(c, w) for c, w, event in steps[1:] if not event]  # the first step warms up
    step = (statistics.median(c for c, _ in plain), statistics.median(w for _, w in plain))
    updates = [(c, w) for c, w in zip(events.cpu, events.wall)]
    scores = tuple(a - b for a, b in zip(before[True].median(), before[False].median()))
    update = tuple(statistics.median(x[i] for x in updates) + scores[i] for i in (0, 1))

    tensors = run.backend.state_tensors()
    chain = SuperpositionChain(engine.tickets.merge)
    parts = {k: Clock() for k in ("merge", "reprune", "swap", "bn")}
    chain.merge(tensors)  # S_0 = P
    for _ in range(args.repeats):
        parts["merge"].wrap(chain.merge)(tensors)
        parts["reprune"].wrap(chain.reprune)(engine.targets, engine.final_keep, run.backend.shard)
        parts["swap"].wrap(chain.swap)(tensors)
        parts["bn"].wrap(run.recorder.recalibrate_bn)()
        parts["swap"].wrap(chain.swap)(tensors)
    sup = {k: c.median() for k, c in parts.items()}
    total = tuple(sup["merge"][i] + sup["reprune"][i] + 2 * sup["swap"][i] + sup["bn"][i] for i in (0, 1))
    return {"step": step, "update": update, "scores": scores, "superposition": total, **sup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet32_cifar", "resnet18"])
    ap.add_argument("--methods", nargs="+", default=["rigl", "set"], choices=["rigl", "set"])
    ap.add_argument("--updates", type=int, default=4, help="topology updates measured per run")
    ap.add_argument("--repeats", type=int, default=2, help="superpositions measured per run")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on timm's test_resnet")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.updates, args.repeats, args.batch = ["test_resnet"], 1, 1, 32
        args.extra = [
            *args.extra,
            "--data.max_train_samples=256",
            "--data.max_eval_samples=64",
            "--data.eval_batch_size=64",
            "--tickets.bn_recal_batches=2",
        ]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    print(
        f"# bench/topology_cost.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"torch {torch.__version__}, 1 thread, batch {args.batch}, density 0.1, {load_line()} at start\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for method in args.methods:
                rows.append((model, method, measure(model, method, args, Path(tmp))))
                print(f"measured {model} {method}, {load_line()}", flush=True)
    print(
        "\nCPU seconds (wall seconds in brackets). Fractions: cost / (ΔT x step time).\n\n"
        "| model | method | step s | update s (of which RigL scores) | update / 1000 steps "
        f"| update / {PRESET_INTERVAL} steps (CPU preset) | superposition s (merge / re-prune / swaps / BN) "
        f"| superposition / 1000 steps | superposition / {PRESET_CYCLE_STEPS}-step cycle (CPU preset) |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for model, method, r in rows:
        step, upd, sup = r["step"][0], r["update"][0], r["superposition"][0]
        print(
            f"| {model} | {method} | {step:.3f} ({r['step'][1]:.3f}) | {upd:.4f} ({r['update'][1]:.4f}) "
            f"({r['scores'][0]:+.4f}) | {100 * upd / (1000 * step):.3f}% | "
            f"{100 * upd / (PRESET_INTERVAL * step):.2f}% | {sup:.3f} ({r['superposition'][1]:.3f}) "
            f"({r['merge'][0]:.3f} / {r['reprune'][0]:.3f} / {2 * r['swap'][0]:.3f} / {r['bn'][0]:.3f}) | "
            f"{100 * sup / (1000 * step):.2f}% | {100 * sup / (PRESET_CYCLE_STEPS * step):.1f}% |"
        )
    print(f"\n{load_line()} at the end")


if __name__ == "__main__":
    main()
