"""Ticket files are written atomically and a damaged one is detected, not half-loaded; a writer
killed at any point leaves a verifiable file and temporaries the next save removes."""

import os
import socket

import pytest
import torch
from crash_helpers import killed_writer

from sparse_sup.backends.local import LocalBackend
from sparse_sup.checkpoint import (
    atomic_torch_save,
    load_sharded,
    load_verified,
    replicated_pieces,
    save_model_snapshot,
    save_sharded,
    sharded,
)
from sparse_sup.checkpoint.tickets import load_model_checkpoint, save_model_checkpoint


def test_snapshot_round_trip_and_corruption_detected(tmp_path):
    path = tmp_path / "tickets" / "ticket_1.pt"
    state = {"w": torch.arange(6.0).view(2, 3), "bn.num_batches_tracked": torch.tensor(4)}
    masks = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    save_model_snapshot(path, state, masks, {"label": "T_1", "step": 7})
    loaded = load_verified(path)
    assert torch.equal(loaded["model"]["w"], state["w"]) and torch.equal(loaded["masks"]["w"], masks["w"])
    assert loaded["meta"] == {"label": "T_1", "step": 7}
    assert not list(path.parent.glob(".*tmp*"))  # no temporary left behind

    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])  # truncated, as by a crash mid-copy
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_verified(path)
    (path.with_name(path.name + ".sha256")).unlink()
    with pytest.raises(ValueError, match="no checksum file"):
        load_verified(path)


# ---- crashes: a real SIGKILL of a forked writer at a chosen point -----------------------------------


def value(path) -> int:
    return int(load_verified(path)["v"])


@pytest.mark.parametrize("nth", [1, 2])
def test_overwrite_killed_after_any_rename_leaves_old_or_new_version(tmp_path, nth):
    """Payload and checksum are two files: whichever rename the crash follows, the file on disk must
    load as the old or the new version, never as 'corrupt' (a complete file with a stale checksum)."""
    path = tmp_path / "state.pt"
    atomic_torch_save({"v": torch.tensor(1)}, path)
    killed_writer(os, "replace", nth, lambda: atomic_torch_save({"v": torch.tensor(2)}, path))
    assert value(path) in (1, 2)


def test_first_write_killed_between_renames_is_absent_not_unverifiable(tmp_path):
    path = tmp_path / "state.pt"
    killed_writer(os, "replace", 1, lambda: atomic_torch_save({"v": torch.tensor(2)}, path))
    assert not path.exists() or value(path) == 2  # nothing published, or the whole new version


def test_next_save_removes_temporaries_of_crashed_writers_only(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"v": torch.tensor(1)}, path)
    # killed with the payload written and fsynced, before its rename: a temporary is left behind
    killed_writer(os, "replace", 1, lambda: atomic_torch_save({"v": torch.tensor(2)}, path), after=False)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(left) == 1, left
    live = tmp_path / f".state.pt.tmp-{os.getppid()}@{socket.gethostname()}"  # a writer that still runs
    live.write_bytes(b"in progress")
    atomic_torch_save({"v": torch.tensor(3)}, path)
    assert value(path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "state.pt", "state.pt.sha256"])


def test_next_sharded_save_removes_crashed_temporary_folders_only(tmp_path):
    pieces = replicated_pieces({"w": torch.arange(12.0).view(3, 4)}, {})
    # killed after its shard file was written, before the manifest: a hidden folder is left behind
    killed_writer(sharded, "_write_rank_file", 1, lambda: save_sharded(tmp_path / "T_1", pieces, {}))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".T_1.tmp-")]) == 1
    live = tmp_path / f".T_9.tmp-{'0' * 12}-{os.getppid()}@{socket.gethostname()}"
    live.mkdir()
    save_sharded(tmp_path / "T_2", pieces, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "T_2"])
    assert torch.equal(load_sharded(tmp_path / "T_2")["w"][0], torch.arange(12.0))


def test_ticket_loads_into_channels_last_weights(tmp_path):
    """A non-contiguous (channels_last) parameter must receive the ticket's values in its own storage."""
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    save_model_checkpoint(tmp_path / "T_1", LocalBackend(source, None, ["0.weight"]), None, {})
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    target = target.to(memory_format=torch.channels_last)
    assert not target[0].weight.is_contiguous()
    load_model_checkpoint(tmp_path / "T_1", LocalBackend(target, None, ["0.weight"]), ["0.weight"])
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert target[0].weight.is_contiguous(memory_format=torch.channels_last)
