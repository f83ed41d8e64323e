"""Extra peak memory per rank of a global re-prune and of a topology update under FSDP2 (CPU, gloo).

What is measured, per rank, on timm ``resnet50`` (25.6M parameters, fp32, 1000 classes) sharded
with ``fsdp2_shard_model`` (``fully_shard`` per Bottleneck, then the root) at world sizes 1, 2, 4.
World size 1 uses the same FSDP2 path on a 1-process gloo group (not LocalBackend), so all three
columns run the same code:

* re-prune        -- ``SuperpositionChain.reprune(targets, keep, shard)``: one global magnitude
                     top-k (``global_magnitude_masks``) over all 54 target weights of S, keep =
                     floor(0.1 * N). S is the CAA average of two tickets with different random masks
                     (density ~0.19 before the re-prune), held as local shards like the model.
* topology update -- ``drop_and_grow(fraction=0.3, grow="gradient")`` (RigL) on ERK masks of
                     density 0.1; the gradient scores are random local tensors, made before
                     measuring (the engine keeps them across the step too).
* control         -- ``DTensor.full_tensor()`` of the largest target weight: an operation known to
                     allocate the whole layer, so the method must report at least that layer's size
                     at world size > 1 (at world size 1 the "gather" is the local tensor itself).

"Extra peak" = peak live tensor bytes during the operation minus live bytes right before it: the
operation runs under ``torch.profiler`` with ``profile_memory=True``; the profiler's allocation and
free events ("[memory]", signed byte counts) are sorted by time and summed, and the largest prefix
sum is the extra peak (frees of older tensors count, so it is exactly peak minus start). Process
RSS is never used. The method is checked first on an op with a known 100 MB temporary. Each rank
measures its own operation; the driver reports the max over ranks.

"Histogram bytes" are what selection all-reduces: one [groups, 256] int64 count histogram per
radix pass plus the [groups] int64 count vector (groups = 1 for the global re-prune, 54 layers for
the topology update), recorded by a wrapper around the shard ``Collectives``.

Goal: at world size 4, each operation's extra peak per rank <= 0.30x its world-size-1 figure.

Usage (driver: runs world sizes 1, 2, 4 through torchrun and prints the table):
    PYTHONPATH=. python bench/memory.py                      # from the repository root
One world size by hand (prints one JSON line on rank 0):
    PYTHONPATH=. OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone \
        --nproc_per_node=4 bench/memory.py --worker
"""

from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "MEMJSON "
MB = 1e6
DENSITY, FRACTION, SEED = 0.1, 0.3, 0


# ---- measuring ------------------------------------------------------------------------------


class LineTags:
    """While active, every executed line of sparse_sup's own files runs inside a profiler
    ``record_function`` named ``path:line``, so each allocation can be traced to a source line."""

    def __init__(self) -> None:
        self.open: dict = {}
        self.pkg = str(ROOT / "sparse_sup")

    def __enter__(self) -> LineTags:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)
        for handle in self.open.values():
            torch.ops.profiler._record_function_exit._RecordFunction(handle)
        self.open.clear()

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename.startswith(self.pkg) else None

    def _line(self, frame, event, arg):
        handle = self.open.pop(frame, None)
        if handle is not None:
            torch.ops.profiler._record_function_exit._RecordFunction(handle)
        if event == "line":
            name = f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"
            self.open[frame] = torch.ops.profiler._record_function_enter_new(name, None)
        return self._line


def _walk_allocations(prof) -> list[tuple[int, int, int, str, str]]:
    """(time ns, ptr, signed bytes, source line, aten op) of every CPU allocation/free event."""
    out = []
    stack = [(root, "-", "-") for root in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        ev, line, op = stack.pop()
        if str(ev.tag).endswith("Allocation"):
            f = ev.extra_fields
            if f.device.type == "cpu":
                out.append((ev.start_time_ns, f.ptr, f.alloc_size, line, op))
            continue
        if ev.name.startswith("sparse_sup/"):
            line = ev.name
        elif ev.name.startswith("aten::") and op == "-":
            op = ev.name  # outermost aten op: what the Python line called
        stack.extend((c, line, op) for c in ev.children)
    out.sort(key=lambda e: e[0])
    return out


def peak_of(prof) -> int:
    """Largest prefix sum of the profiler's CPU memory events in time order (bytes)."""
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep the recorded order
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def live_at_peak(prof, top: int = 12) -> tuple[int, str]:
    """Replay allocations by pointer; at the peak, sum the still-live bytes by (line, aten op)."""
    allocs = _walk_allocations(prof)
    live_sum, peak, peak_at = 0, 0, -1
    for i, (_, _, nbytes, _, _) in enumerate(allocs):
        live_sum += nbytes
        if live_sum > peak:
            peak, peak_at = live_sum, i
    live: dict[int, tuple[int, str, str]] = {}
    for _, ptr, nbytes, line, op in allocs[: peak_at + 1]:
        if nbytes > 0:
            live[ptr] = (nbytes, line, op)
        else:
            live.pop(ptr, None)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for nbytes, line, op in live.values():
        groups[line, op][0] += nbytes
        groups[line, op][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    text = [
        f"  live at the peak ({peak / MB:.1f} MB), by allocating source line and aten op:",
        "  | MB live | tensors | line | op | source |",
        "  |---|---|---|---|---|",
    ]
    for (line, op), (nbytes, count) in rows:
        src = ""
        if line != "-":
            path, lineno = line.rsplit(":", 1)
            src = linecache.getline(str(ROOT / path), int(lineno)).strip()[:90]
        text.append(f"  | {nbytes / MB:.2f} | {count} | {line} | {op} | `{src}` |")
    return peak, "\n".join(text)


def measure(fn: Callable[[], object], breakdown: bool = False) -> dict:
    """Run ``fn`` under the memory profiler; extra peak bytes (and optional breakdown text)."""
    gc.collect()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with LineTags():
            result = fn()
    del result
    out = {"peak": peak_of(prof)}
    if breakdown:
        tree_peak, out["live"] = live_at_peak(prof)
        if tree_peak != out["peak"]:
            out["live"] += (
                f"\n  (note: event-tree peak {tree_peak} B differs from flat-event peak {out['peak']} B)"
            )
        out["ops"] = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=15)
    return out


class CountingCollectives:
    """The shard ``Collectives`` with a record of what is all-reduced (shape, dtype, bytes)."""

    def __init__(self, inner) -> None:
        self.inner, self.log = inner, []

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def rank(self) -> int:
        return self.inner.rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self.log.append((tuple(tensor.shape), tensor.element_size() * tensor.numel()))
        self.inner.all_reduce_sum(tensor)

    def histogram_bytes(self) -> tuple[int, int]:
        """(one [G,256] histogram + the [G] count vector, total bytes all-reduced)."""
        hist = max((b for s, b in self.log if len(s) == 2 and s[1] == 256), default=0)
        groups = max((s[0] for s, _ in self.log if len(s) == 2 and s[1] == 256), default=0)
        return hist + 8 * groups, sum(b for _, b in self.log)


# ---- one world size (torchrun worker) -------------------------------------------------------


def worker(breakdown: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sparse_sup.backends.fsdp2 import FSDP2Backend, fsdp2_shard_model
    from sparse_sup.core.masks import MaskState
    from sparse_sup.core.topology import drop_and_grow
    from sparse_sup.models import build_model, select_targets
    from sparse_sup.tickets.superpose import SuperpositionChain

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res: dict = {"world": world}

    # sanity check of the method: exp() of a 100 MB tensor allocates one 100 MB temporary
    x = torch.randn(25_000_000)
    res["sanity_expected"] = x.numel() * 4
    res["sanity"] = measure(lambda x=x: torch.exp(x).sum())["peak"]
    del x

    torch.manual_seed(SEED)
    model = build_model("resnet50", 1000)
    names = select_targets(model)
    full = dict(model.named_parameters())
    res["model_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    res["params"] = sum(p.numel() for p in model.parameters())
    biggest = max(names, key=lambda n: full[n].numel())
    res["layer"], res["layer_bytes"] = biggest, full[biggest].numel() * 4
    fsdp2_shard_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = FSDP2Backend(model, opt, names)
    shard = CountingCollectives(backend.shard)
    targets = backend.targets()
    res["targets"] = len(targets)
    state = backend.state_tensors()
    res["local_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    dense = [t.param.clone() for t in targets]
    masks = MaskState.initialize(targets, DENSITY, "erk", SEED, shard)  # zeroes the weights

    # S = CAA(T_a, T_b): T_a is the masked model, T_b the dense weights under another random mask
    chain = SuperpositionChain("caa")
    chain.merge(state)
    gen = torch.Generator().manual_seed(SEED + 1000 + rank)
    other = {t.name: d * (torch.rand(d.shape, generator=gen) < DENSITY) for t, d in zip(targets, dense)}
    chain.merge({n: other.get(n, t) for n, t in state.items()})
    del dense, other
    keep = int(DENSITY * sum(t.numel for t in targets))
    grad_scores = {t.name: torch.rand(t.param.shape, generator=gen) for t in targets}

    dist.barrier()
    shard.log.clear()
    reprune = measure(lambda: chain.reprune(targets, keep, shard), breakdown)
    res["reprune"], res["reprune_hist"] = reprune["peak"], shard.histogram_bytes()
    dist.barrier()
    shard.log.clear()
    update = measure(
        lambda: drop_and_grow(targets, masks, FRACTION, "gradient", 1, SEED, shard, grad_scores), breakdown
    )
    res["update"], res["update_hist"] = update["peak"], shard.histogram_bytes()
    dist.barrier()
    param = dict(model.named_parameters())[biggest]
    assert isinstance(param, DTensor)
    res["control"] = measure(lambda: param.full_tensor())["peak"]

    # max over ranks of every per-rank number
    keys = ["sanity", "local_bytes", "reprune", "update", "control"]
    mine = torch.tensor([float(res[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    res.update({k: int(v) for k, v in zip(keys, mine.tolist())})
    if rank == 0:
        if breakdown:
            res["breakdown"] = {"reprune": reprune, "update": update}
        print(PREFIX + json.dumps(res), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo can crash at interpreter exit


# ---- driver ---------------------------------------------------------------------------------


def run_world(n: int, breakdown: bool, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(Path(__file__).resolve()),
        "--worker",
    ] + (["--breakdown"] if breakdown else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    lines = [ln[len(PREFIX) :] for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if not lines:
        raise RuntimeError(
            f"world {n} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1])


def driver(worlds: list[int], timeout: int) -> None:
    print(
        f"torch {torch.__version__}; resnet50 (1000 classes, fp32) under FSDP2 fully_shard, gloo on CPU; "
        f"world size 1 = the same FSDP2 path on a 1-process group"
    )
    res = {}
    for n in worlds:
        res[n] = run_world(n, breakdown=(n == max(worlds)), timeout=timeout)
        r = res[n]
        print(
            f"world {n}: sanity check exp() of a 100 MB tensor -> extra peak {r['sanity']:,} B "
            f"(expected >= {r['sanity_expected']:,} B, the temporary)",
            flush=True,
        )
    base = res[worlds[0]]
    print(
        f"\nModel: resnet50, {base['params'] / 1e6:.2f}M parameters, {base['targets']} target weights; "
        f"re-prune keeps floor({DENSITY} N); update: RigL drop/grow fraction {FRACTION} "
        f"at ERK density {DENSITY}. "
        f"All memory figures are the max over ranks.\n"
    )
    print(
        "| world size | model MB | local shard MB (rank max) | re-prune extra peak MB "
        "| topology update extra peak MB | histogram bytes (re-prune / update) "
        "| ratio to world 1 (re-prune / update) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in worlds:
        r = res[n]
        (hr, _), (hu, _) = r["reprune_hist"], r["update_hist"]
        ratio = f"{r['reprune'] / base['reprune']:.3f} / {r['update'] / base['update']:.3f}"
        print(
            f"| {n} | {r['model_bytes'] / MB:.1f} | {r['local_bytes'] / MB:.1f} | {r['reprune'] / MB:.1f} "
            f"| {r['update'] / MB:.1f} | {hr:,} / {hu:,} | {ratio} |"
        )
    print(
        f"\nControl (gather one whole layer, `{base['layer']}`, {base['layer_bytes'] / MB:.2f} MB, "
        f"via DTensor.full_tensor()):\n"
    )
    print("| world size | control extra peak MB | layer MB | extra / layer |")
    print("|---|---|---|---|")
    for n in worlds:
        r = res[n]
        print(
            f"| {n} | {r['control'] / MB:.2f} | {r['layer_bytes'] / MB:.2f} "
            f"| {r['control'] / r['layer_bytes']:.2f} |"
        )
    print(
        "\nHistogram bytes = one [groups,256] int64 histogram + the [groups] int64 count vector "
        "(groups 1 for the re-prune, one per layer for the update); total bytes all-reduced per operation "
        "(all radix passes, count vectors, mask recount): "
        + ", ".join(
            f"world {n}: {res[n]['reprune_hist'][1]:,} / {res[n]['update_hist'][1]:,}" for n in worlds
        )
    )
    top = max(worlds)
    if top > 1:
        ok = [res[top][k] <= 0.30 * base[k] for k in ("reprune", "update")]
        print(
            f"\nGoal (world {top} <= 0.30x world {worlds[0]}): re-prune {'met' if ok[0] else 'NOT met'}, "
            f"topology update {'met' if ok[1] else 'NOT met'}."
        )
    br = res[top].get("breakdown")
    if br:
        for op in ("reprune", "update"):
            print(
                f"\nBreakdown, world {top}, rank 0, {op}:\n{br[op]['live']}\n\n"
                f"  top ops by self CPU memory (prof.key_averages()):\n{br[op]['ops']}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help="run one world size (under torchrun)")
    ap.add_argument("--breakdown", action="store_true", help="worker: also return live-at-peak breakdowns")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per world size")
    args = ap.parse_args()
    if args.worker:
        worker(args.breakdown)
    else:
        driver(args.worlds, args.timeout)


if __name__ == "__main__":
    main()
