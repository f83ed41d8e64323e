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

Run checkpoints (``--run``, issue 19 item 5): what each DDP rank writes and hashes in one
``save_run_checkpoint`` of a ResNet-50 run, and its wall time, for three protocols side by side in
the same processes (rotating order, median of ``--repeats``): "0c40b65" (where issue 19 was read:
every rank writes its whole sparse state -- masks, chain, mask history -- into its own file; rank 0
then hashes every file while the others wait), "80801d0" (since 98cf563: the sparse state written
once as a sharded checkpoint split over the ranks; rank 0 still hashes every file) and "now" (the
same files; the sparse state's digests come from its writers as the bytes are written, the engine's
files are hashed by the rank that wrote them). "verify" is one verification of the checkpoint just
written, as a resume does it: rank 0 alone before (a resume did it up to three times), over the
ranks now (``verify_checkpoint``; later asks of the unchanged checkpoint are free). The two older
protocols are re-enacted here (``legacy_save``) with the library's own writers. The sparse state is
synthetic but shaped like a run's: masks of every Conv/Linear weight (bool), the chain's fp32 copy
of every parameter and its masks, the mask history (last, ever); model + SGD momentum through DCP
(``LocalBackend``, DDP's whole-tensor layouts).

Usage:
    PYTHONPATH=. python bench/checkpoint.py                      # resnet50, world sizes 1 2 4 (~2 min)
    PYTHONPATH=. python bench/checkpoint.py --smoke              # tiny model, one process, seconds
    PYTHONPATH=. python bench/checkpoint.py --run                # run checkpoints, resnet50, worlds 2 4
    PYTHONPATH=. python bench/checkpoint.py --run --smoke        # the same on test_resnet, world 2
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


# ---- run checkpoints (--run) -----------------------------------------------------------------

PROTOCOLS = ("0c40b65", "80801d0", "now")
HASH_TIME = [0.0]


def run_state_of(model_name: str, rank: int):
    """(backend, picklable sparse state of this rank, its pieces and rest as a run splits them)."""
    from sparse_sup.backends.local import LocalBackend
    from sparse_sup.checkpoint.state_pieces import parameter_layouts, split_state

    torch.manual_seed(SEED)  # the same replica on every rank
    model = build_model(model_name, 1000)
    targets = select_targets(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers exist
    backend = LocalBackend(model, optimizer, targets)
    backend.kind = "ddp"
    g = torch.Generator().manual_seed(SEED)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.1 for n in targets}

    def copy(tensors: dict) -> dict:  # torch.save would store shared tensors once
        return {n: t.clone() for n, t in tensors.items()}

    state = {
        "engine": {
            "step": 1000,
            "masks": masks,
            "chain": {"tensors": {n: p.detach().clone() for n, p in params.items()}, "masks": copy(masks)},
        },
        "mask_history": {"last": copy(masks), "ever": copy(masks)},  # a run's are tensors of their own
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},  # per rank in a run
        "rng": torch.get_rng_state(),
    }
    pieces, rest = split_state(state, parameter_layouts(backend))
    return backend, state, pieces, rest


def legacy_save(run_dir: Path, step: int, backend, sparse_state: dict, pieces: dict | None) -> Path:
    """``save_run_checkpoint`` as it was before this change: every rank writes, barrier, then rank 0
    alone hashes every file of the checkpoint (``pieces`` None: the 0c40b65 layout)."""
    from sparse_sup.checkpoint import run_state
    from sparse_sup.checkpoint.files import _atomic_write_bytes, _fsync_dir, atomic_torch_save
    from sparse_sup.checkpoint.sharded import save_sharded
    from sparse_sup.checkpoint.state_pieces import rank_file

    rank, world, _ = run_state._dist()
    tmp = run_dir / f"tmp_{step:08d}"
    final = run_dir / f"step_{step:08d}"
    if rank == 0:
        tmp.mkdir(parents=True)
    run_state._barrier()
    backend.save_training_state(tmp / "engine")
    if pieces is not None:
        save_sharded(tmp / run_state.SHARDED_STATE, pieces, {"step": step})
    atomic_torch_save(sparse_state, tmp / "sparse_sup" / rank_file(rank))
    run_state._barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for folder in {p.parent for p in files}:
            _fsync_dir(folder)
        digests = {str(p.relative_to(tmp)): run_state._sha256(p) for p in files}
        manifest = {"format": 1, "step": step, "world_size": world, "files": digests}
        _atomic_write_bytes(tmp / run_state.MANIFEST, json.dumps(manifest, indent=1).encode())
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    run_state._barrier()
    return final


def writer_of(name: str, world: int) -> int:
    """Which rank wrote the file ``name`` of a run checkpoint (by the writers' naming)."""
    import re

    from sparse_sup.checkpoint.run_state import _writer_rank

    for pattern in (r"shard-(\d+)-of-", r"rank(\d+)\.pt"):
        found = re.search(pattern, name)
        if found:
            return int(found.group(1))
    owner = _writer_rank(name, world)
    return 0 if owner is None else owner  # DCP's .metadata, the manifests: rank 0


def run_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from sparse_sup.checkpoint import run_state

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    backend, state, pieces, rest = run_state_of(args.model, rank)
    original = run_state._sha256

    def timed(path: Path) -> str:
        t0 = time.perf_counter()
        try:
            return original(path)
        finally:
            HASH_TIME[0] += time.perf_counter() - t0

    run_state._sha256 = timed
    results: dict[str, list] = {p: [] for p in PROTOCOLS}
    for i in range(args.repeats):
        for k in range(len(PROTOCOLS)):
            protocol = PROTOCOLS[(i + k) % len(PROTOCOLS)]
            run_dir = Path(args.tmp) / f"w{world}-{protocol}-{i}"
            HASH_TIME[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            if protocol == "now":
                path = run_state.save_run_checkpoint(run_dir, 1000, backend, rest, 1, pieces)
            else:
                whole = protocol == "0c40b65"
                path = legacy_save(
                    run_dir, 1000, backend, state if whole else rest, None if whole else pieces
                )
            wall, hashing = time.perf_counter() - t0, HASH_TIME[0]
            run_state._VERIFIED.clear()
            dist.barrier()
            t0 = time.perf_counter()
            if protocol == "now":
                assert run_state.verify_checkpoint(path) == []
            else:
                assert run_state._broadcast(run_state.checkpoint_problems(path) if rank == 0 else None) == []
            verify = time.perf_counter() - t0
            per_rank = [0] * world
            if rank == 0:
                for p in path.rglob("*"):
                    if p.is_file():
                        per_rank[writer_of(str(p.relative_to(path)), world)] += p.stat().st_size
            timing = torch.tensor([wall, hashing, verify], dtype=torch.float64)
            gathered = [torch.zeros_like(timing) for _ in range(world)]
            dist.all_gather(gathered, timing)
            results[protocol].append(
                {
                    "wall": max(float(t[0]) for t in gathered),
                    "hash": [float(t[1]) for t in gathered],
                    "verify": max(float(t[2]) for t in gathered),
                    "bytes": per_rank,
                }
            )
            dist.barrier()
            if rank == 0:
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
    if rank == 0:
        out = {}
        for protocol, runs in results.items():
            walls = sorted(r["wall"] for r in runs)
            median = runs[[r["wall"] for r in runs].index(walls[len(walls) // 2])]
            out[protocol] = {"world": world, "walls": walls, **median}
        print(PREFIX + json.dumps(out), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo can crash at interpreter exit


def run_checkpoint_world(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [
        __file__,
        "--run-worker",
        "--tmp",
        str(tmp),
        "--model",
        args.model,
        "--repeats",
        str(args.repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    lines = [ln[len(PREFIX) :] for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if not lines:
        raise RuntimeError(
            f"world {n} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1])


def run_table(worlds: list[dict], model: str, repeats: int) -> str:
    lines = [
        f"Run checkpoint of {model} under DDP (gloo, CPU), one save per protocol and repeat, "
        f"median wall of {repeats}; torch {torch.__version__}.",
        "",
        "| world | protocol | MB written by rank (0 / 1 / ...) | total MB | rank 0 hashes s "
        "| other ranks hash s | checkpoint wall s (median; all) | verify s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in worlds:
        for protocol in PROTOCOLS:
            r = res[protocol]
            others = r["hash"][1:]
            lines.append(
                f"| {r['world']} | {protocol} | {' / '.join(f'{b / MB:.1f}' for b in r['bytes'])} "
                f"| {sum(r['bytes']) / MB:.1f} | {r['hash'][0]:.3f} "
                f"| {' / '.join(f'{h:.3f}' for h in others)} "
                f"| **{r['wall']:.3f}** ({', '.join(f'{w:.2f}' for w in r['walls'])}) | {r['verify']:.3f} |"
            )
    return "\n".join(lines)


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
    parser.add_argument(
        "--run", action="store_true", help="run checkpoints under DDP: bytes and hashing per rank"
    )
    parser.add_argument("--repeats", type=int, default=3, help="--run: saves per protocol")
    parser.add_argument("--run-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("test_resnet" if args.smoke else "resnet50")
    if args.worker:
        worker(args)
    if args.run_worker:
        run_worker(args)
    if args.run:
        with tempfile.TemporaryDirectory(prefix="run-ckpt-bench-") as tmp:
            worlds = args.worlds or ([2] if args.smoke else [2, 4])
            text = run_table(
                [run_checkpoint_world(n, args, Path(tmp)) for n in worlds], args.model, args.repeats
            )
        if args.out:
            args.out.write_text(text + "\n")
        print(text)
        return text
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
