"""Ticket files are written atomically and a damaged one is detected, not half-loaded."""

import pytest
import torch

from sparse_sup.checkpoint import load_verified, save_model_snapshot


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
