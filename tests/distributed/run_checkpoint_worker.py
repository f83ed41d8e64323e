"""A run checkpoint written by real gloo DDP ranks (torchrun). ``save OUT`` writes one at step 7
(and one at step 9, which rank 0 then damages) with a LocalBackend (model + SGD momentum through
DCP) and the sparse state a run saves (masks, superposition chain, mask history as replicated
pieces; a small per-rank rest), recording which files each rank hashed; then finds the newest
intact one (``latest_checkpoint``: step 7), loads it back and checks that every rank gets its own
state exactly. Rank 0 writes the report to OUT + ".json"."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparse_sup.backends.local import LocalBackend  # noqa: E402
from sparse_sup.checkpoint import run_state  # noqa: E402
from sparse_sup.checkpoint.state_pieces import parameter_layouts, read_state, split_state  # noqa: E402


def model_and_backend() -> LocalBackend:
    torch.manual_seed(0)  # the same replica on every rank, as DDP has it
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 256)).sum().backward()
    optimizer.step()  # momentum buffers exist
    backend = LocalBackend(model, optimizer, ["0.weight", "2.weight"])
    backend.kind = "ddp"  # the layouts are DDP's: whole tensors on every rank
    return backend


def sparse_state(backend: LocalBackend, rank: int) -> dict:
    """What ``Trainer.save_checkpoint`` saves, in miniature: replicated per-parameter tensors and
    a per-rank rest (buffers and RNG differ between ranks)."""
    g = torch.Generator().manual_seed(1)
    params = dict(backend.module.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.3 for n in backend.target_names}
    chain = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    return {
        "engine": {"step": 7, "masks": masks, "chain": {"tensors": chain, "masks": dict(masks)}},
        "mask_history": {"last": dict(masks), "ever": dict(masks)},
        "buffers": {"1.running_mean": torch.full((512,), float(rank))},
        "rng": torch.get_rng_state(),
    }


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def relative(path: str, out: Path) -> str:
    """``path`` relative to the checkpoint folder (temporary or published) it lies in."""
    return str(Path(*Path(path).relative_to(out / run_state.CHECKPOINTS).parts[1:]))


def main() -> None:
    out = Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hashed: list[tuple[str, int]] = []
    original = run_state._sha256

    def recording(path: Path) -> str:
        hashed.append((str(path), path.stat().st_size))
        return original(path)

    def taken() -> list:
        names = [(relative(p, out), n) for p, n in hashed]
        hashed.clear()
        return names

    run_state._sha256 = recording
    backend = model_and_backend()
    state = sparse_state(backend, rank)
    pieces, rest = split_state(state, parameter_layouts(backend))
    path = run_state.save_run_checkpoint(out, 7, backend, rest, keep=2, pieces=pieces)
    during_save = taken()
    later = run_state.save_run_checkpoint(out, 9, backend, rest, keep=2, pieces=pieces)
    hashed.clear()
    dist.barrier()
    if rank == 0:  # the newest is damaged: every rank must fall back to step 7
        file = later / "engine" / "__1_0.distcp"
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    dist.barrier()
    chosen = run_state.latest_checkpoint(out)
    during_latest = [(str(Path(p).relative_to(out / run_state.CHECKPOINTS)), n) for p, n in hashed]
    hashed.clear()
    loaded, sharded = run_state.load_run_checkpoint(chosen, backend)
    during_load = taken()
    back = read_state(loaded, sharded, backend)
    report = {
        "rank": rank,
        "hashed": during_save,
        "hashed_latest": during_latest,
        "hashed_load": during_load,
        "chosen": str(chosen),
        "resumed_equal": same(back, state),
    }
    reports = [None] * world if rank == 0 else None
    dist.gather_object(report, reports, dst=0)
    if rank == 0:
        Path(str(out) + ".json").write_text(json.dumps({"checkpoint": str(path), "ranks": reports}))
    dist.destroy_process_group()


if __name__ == "__main__":
    assert sys.argv[1] == "save", sys.argv
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
