"""Tickets as compact sharded checkpoints: size on disk vs a dense ``torch.save``, write/read time,
and extra peak memory per rank of a sharded ticket write at several world sizes (CPU, gloo).

The ticket: timm ``resnet50`` (1000 classes, fp32, seeded init); every Conv/Linear weight
(``select_targets``) keeps ``layer_counts(shapes, density, "erk")`` weights chosen at random (top-k
of seeded uniform keys), the rest are zero; biases, BN weights and buffers stay dense. Dense
baseline: ``torch.save(state_dict)`` of that ticket. Sharded ticket: ``save_sharded`` with the
masks (one process: ``replicated_pieces``); its size is every file in the directory (shards and
manifest). Times are the best of 3 (file writes end with fsync in both; reads come from the page
cache) on a shared 2-core machine: expect +-30% noise.

Memory: each rank holds FSDP2-style pieces (dim-0 row runs, ``torch.chunk`` placement: tail ranks
get fewer rows or none; BN buffers replicated), built before measuring. The write runs once for
time, then once under ``torch.profiler`` (``profile_memory``: largest prefix sum of CPU allocation
events = torch extra peak) with ``tracemalloc`` on (numpy's packed bits and Python bytes). Both
methods are checked first on known 100 MB temporaries. Each rank measures its own write; the table
shows the max over ranks. "read" = each rank loading its own runs (only overlapping files).

Usage:
    PYTHONPATH=. python bench/checkpoint.py                      # resnet50, world sizes 1 2 4 (~2 min)
    PYTHONPATH=. python bench/checkpoint.py --smoke              # tiny model, one process, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_sup.checkpoint.sharded import LocalPiece, load_sharded, replicated_pieces, save_sharded  # noqa: E402
from sparse_sup.core.density import layer_counts  # noqa: E402
from sparse_sup.models import build_model, select_targets  # noqa: E402

PREFIX = "CKPTJSON "
MB = 1e6
SEED = 0


def make_ticket(model_name: str, density: float) -> tuple[dict, dict, set[str]]:
    """(state_dict with zeros outside the masks, masks of the targets, parameter names)."""
    torch.manual_seed(SEED)
    model = build_model(model_name, 1000)
    targets = select_targets(model)
    params = dict(model.named_parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counts = layer_counts([params[n].shape for n in targets], density, "erk")
    g = torch.Generator().manual_seed(SEED)
    masks = {}
    for name, k in zip(targets, counts):
        keys = torch.rand(params[name].numel(), generator=g)
        mask = torch.zeros(params[name].numel(), dtype=torch.bool)
        mask[keys.topk(k).indices] = True
        masks[name] = mask.reshape(params[name].shape)
        state[name].mul_(masks[name])
    return state, masks, set(params)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def sizes_and_times(model_name: str, density: float, tmp: Path) -> dict:
    """One process: dense torch.save vs sharded ticket (sizes, write and read times)."""
    state, masks, _ = make_ticket(model_name, density)
    tmp = tmp / f"sizes-{density}"
    tmp.mkdir()

    def dense_write(i: int) -> None:
        with open(tmp / f"dense{i}.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    out = {"density": density, "dense_write": best_of(dense_write)}
    out["dense_read"] = best_of(lambda i: torch.load(tmp / f"dense{i}.pt", weights_only=True))
    out["dense_bytes"] = (tmp / "dense0.pt").stat().st_size
    pieces = replicated_pieces(state, masks)
    out["ticket_write"] = best_of(lambda i: save_sharded(tmp / f"ticket{i}", pieces, {"density": density}))
    out["ticket_read"] = best_of(lambda i: load_sharded(tmp / f"ticket{i}"))
    out["ticket_bytes"] = dir_bytes(tmp / "ticket0")
    got = load_sharded(tmp / "ticket0")
    assert all(torch.equal(got[n][0], t.reshape(-1)) for n, t in state.items()), "ticket did not round-trip"
    assert all(torch.equal(got[n][1], m.reshape(-1)) for n, m in masks.items()), "masks did not round-trip"
    kept = sum(int(m.sum()) for m in masks.values())
    out["target_density"] = kept / sum(m.numel() for m in masks.values())
    out["params"] = sum(t.numel() for t in state.values())
    return out


# ---- one rank's sharded write (torchrun worker, or in-process at world size 1) --------------


def row_run(shape: torch.Size, world: int, rank: int) -> tuple[int, int]:
    """FSDP2's dim-0 placement as (global flat offset, numel)."""
    if len(shape) == 0:
        return (0, 1) if rank == 0 else (0, 0)
    rows, per_row = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world)
    start, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    return start * per_row, (stop - start) * per_row


def torch_peak(prof) -> int:
    """Largest prefix sum of the profiler's CPU memory events in time order (bytes)."""
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(fn) -> tuple[int, int]:
    """(torch extra peak, numpy/Python extra peak) in bytes of running ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    gc.disable()  # a cyclic collection inside fn would free older objects and hide part of the peak
    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        python = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    finally:
        gc.enable()
    return torch_peak(prof), python


def rank_write(model_name: str, density: float, tmp: Path, world: int, rank: int, sanity_mb: int) -> dict:
    import torch.distributed as dist

    on = dist.is_initialized()
    barrier = dist.barrier if on else (lambda: None)
    res = {"world": world}
    n = sanity_mb * 250_000
    x = torch.randn(n)
    res["sanity_torch"], _ = measure(lambda x=x: torch.exp(x).sum())
    _, res["sanity_numpy"] = measure(lambda: np.ones(n, dtype=np.float32).sum())
    res["sanity_expected"] = n * 4
    del x

    state, masks, params = make_ticket(model_name, density)
    pieces = {}
    for name, t in state.items():
        if name not in params:  # BN buffers: replicated under FSDP2
            pieces[name] = LocalPiece(tuple(t.shape), 0, t.clone(), None, replicated=True)
            continue
        offset, numel = row_run(t.shape, world, rank)
        run = slice(offset, offset + numel)
        mask = masks[name].reshape(-1)[run].clone() if name in masks else None
        pieces[name] = LocalPiece(tuple(t.shape), offset, t.reshape(-1)[run].clone(), mask)
    del state, masks
    gc.collect()
    res["local_bytes"] = sum(
        p.values.numel() * p.values.element_size() + (0 if p.mask is None else p.mask.numel())
        for p in pieces.values()
    )
    res["largest_piece"] = max(p.values.numel() * p.values.element_size() for p in pieces.values())
    barrier()
    t0 = time.perf_counter()
    save_sharded(tmp / f"w{world}-timed", pieces, {"density": density})
    res["write"] = time.perf_counter() - t0
    barrier()
    res["torch_peak"], res["numpy_peak"] = measure(
        lambda: save_sharded(tmp / f"w{world}-measured", pieces, {"density": density})
    )
    barrier()
    manifest = json.loads((tmp / f"w{world}-timed" / "manifest.json").read_text())
    res["file_bytes"] = manifest["files"][rank]["bytes"]
    wanted = {
        name: (0, p.values.numel()) if p.replicated else (p.offset, p.values.numel())
        for name, p in pieces.items()
    }
    t0 = time.perf_counter()
    got = load_sharded(tmp / f"w{world}-timed", wanted)
    res["read"] = time.perf_counter() - t0
    for name, p in pieces.items():
        assert torch.equal(got[name][0], p.values.reshape(-1)), name
    keys = [k for k in res if k != "world"]
    mine = res["torch_peak"] + res["numpy_peak"]
    res["extra_by_rank"] = [mine] * world
    if on:  # every rank's extra peak, then the max over ranks of every per-rank number
        dist.all_gather_object(res["extra_by_rank"], mine)
        mine = torch.tensor([float(res[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        res.update(zip(keys, mine.tolist()))
    return res


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    res = rank_write(
        args.model, args.densities[0], Path(args.tmp), dist.get_world_size(), dist.get_rank(), 100
    )
    if dist.get_rank() == 0:
        print(PREFIX + json.dumps(res), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo can crash at interpreter exit


def run_world(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [
        __file__,
        "--worker",
        "--tmp",
        str(tmp),
        "--model",
        args.model,
        "--densities",
        str(args.densities[0]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    lines = [ln[len(PREFIX) :] for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if not lines:
        raise RuntimeError(
            f"world {n} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1])


# ---- driver ---------------------------------------------------------------------------------


def tables(sizes: list[dict], writes: list[dict], model: str) -> str:
    lines = [
        f"Model {model}: {sizes[0]['params'] / 1e6:.2f}M values in the state_dict, fp32, ERK random masks "
        f"on every Conv/Linear weight; torch {torch.__version__}, CPU.",
        "",
        "| density | dense torch.save MB | sharded ticket MB | ticket / dense | dense write s | dense read s "
        "| ticket write s | ticket read s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        lines.append(
            f"| {s['density']} (targets {s['target_density']:.4f}) | {s['dense_bytes'] / MB:.2f} "
            f"| {s['ticket_bytes'] / MB:.2f} | **{s['ticket_bytes'] / s['dense_bytes']:.3f}** "
            f"| {s['dense_write']:.3f} | {s['dense_read']:.3f} | {s['ticket_write']:.3f} "
            f"| {s['ticket_read']:.3f} |"
        )
    lines += [
        "",
        f"Sharded ticket write at density {sizes[0]['density']}, per rank "
        "(max over ranks); FSDP2-style row shards, replicated BN buffers:",
        "",
        "| world | local shard MB (values+masks) | largest local piece MB | file written MB "
        "| extra peak torch MB | extra peak numpy/Python MB | extra peak / local shard "
        "| extra peak by rank MB | write s | read own runs s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in writes:
        extra = w["torch_peak"] + w["numpy_peak"]
        lines.append(
            f"| {int(w['world'])} | {w['local_bytes'] / MB:.2f} | {w['largest_piece'] / MB:.2f} "
            f"| {w['file_bytes'] / MB:.2f} | {w['torch_peak'] / MB:.2f} | {w['numpy_peak'] / MB:.2f} "
            f"| {extra / w['local_bytes']:.3f} | {' / '.join(f'{b / MB:.2f}' for b in w['extra_by_rank'])} "
            f"| {w['write']:.3f} | {w['read']:.3f} |"
        )
    lines += ["", "Method check (known temporaries, expected MB -> measured torch / numpy MB):"]
    for w in writes:
        lines.append(
            f"- world {int(w['world'])}: {w['sanity_expected'] / MB:.0f} -> {w['sanity_torch'] / MB:.1f} / "
            f"{w['sanity_numpy'] / MB:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="timm test_resnet, one process (seconds)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("test_resnet" if args.smoke else "resnet50")
    if args.worker:
        worker(args)
    worlds = args.worlds or ([1] if args.smoke else [1, 2, 4])
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        tmp = Path(tmp)
        sizes = [sizes_and_times(args.model, d, tmp) for d in args.densities]
        writes = []
        for n in worlds:
            if args.smoke and n == 1:  # in-process, no process group: the one-process path
                writes.append(rank_write(args.model, args.densities[0], tmp, 1, 0, 10))
            else:
                writes.append(run_world(n, args, tmp))
    text = tables(sizes, writes, args.model)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
