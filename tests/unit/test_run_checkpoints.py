"""Run checkpoints on disk: rotation keeps the checkpoint just written (never a damaged or abandoned
later one), a run with only damaged checkpoints is not silently restarted, and the temporary folder
of a save killed mid-write is removed by the next save."""

from __future__ import annotations

import pytest
import torch
from crash_helpers import killed_writer

from sparse_sup.backends.local import LocalBackend
from sparse_sup.checkpoint import CheckpointError, run_state
from sparse_sup.checkpoint.run_state import latest_checkpoint, list_checkpoints, save_run_checkpoint


@pytest.fixture
def backend():
    model = torch.nn.Linear(4, 3)
    return LocalBackend(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), ["weight"])


def save(run_dir, step, backend, keep=2):
    return save_run_checkpoint(run_dir, step, backend, {"step": torch.tensor(step)}, keep)


def corrupt(checkpoint):
    rank_file = checkpoint / "sparse_sup" / "rank00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))


def steps(run_dir) -> list[int]:
    return [run_state.checkpoint_step(p) for p in list_checkpoints(run_dir)]


def test_rotation_keeps_the_checkpoint_just_written_not_a_damaged_later_one(tmp_path, backend):
    """Resumed from step 5 because step 10 is damaged; keep_last=1 must not delete the new step-8
    checkpoint in favour of the damaged (and abandoned) step 10."""
    save(tmp_path, 5, backend)
    corrupt(save(tmp_path, 10, backend))
    assert latest_checkpoint(tmp_path).name == "step_00000005"  # the resume falls back
    save(tmp_path, 8, backend, keep=1)
    assert steps(tmp_path) == [8]
    assert latest_checkpoint(tmp_path).name == "step_00000008"


def test_only_damaged_checkpoints_are_refused_not_ignored(tmp_path, backend):
    assert latest_checkpoint(tmp_path) is None  # no checkpoint yet: a fresh start is right
    corrupt(save(tmp_path, 5, backend))
    with pytest.raises(CheckpointError, match=r"checkpoints holds 1 checkpoint\(s\) \(step_00000005\)"):
        latest_checkpoint(tmp_path)


def test_next_save_removes_the_folder_of_a_save_killed_mid_write(tmp_path, backend):
    # killed with the model/optimizer written, before its sparse state and manifest (as in the
    # resume tests' "checkpoint" kill point); the next save is at another step
    killed_writer(run_state, "atomic_torch_save", 1, lambda: save(tmp_path, 5, backend), after=False)
    root = tmp_path / "checkpoints"
    assert [p.name.startswith(".tmp_step_00000005") for p in root.iterdir()] == [True]
    save(tmp_path, 3, backend)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
