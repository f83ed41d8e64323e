"""Sharded checkpoint format in one process: round trips, packed bits, refusal of damaged files."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_sup.checkpoint import (
    CheckpointError,
    LocalPiece,
    load_sharded,
    read_manifest,
    replicated_pieces,
    save_sharded,
    verify_sharded,
)

SHARD = "shard-00000-of-00001.bin"


def ticket() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    named = {
        "w32": torch.randn(6, 5, generator=g),
        "w64": torch.randn(3, 3, 3, dtype=torch.float64, generator=g),
        "wbf16": torch.randn(17, generator=g).to(torch.bfloat16),
        "empty_mask": torch.randn(4, 4, generator=g),
        "full_mask": torch.randn(9, generator=g),
        "counter": torch.tensor(12345678901, dtype=torch.int64),  # 0-d, like num_batches_tracked
        "scalar": torch.tensor(-0.5),
        "counts": torch.arange(5, dtype=torch.int64),
        "nothing": torch.zeros(0, 3),
    }
    named["w32"][0, 0] = -0.0  # an active signed zero must survive
    masks = {
        "w32": torch.rand(6, 5, generator=g) < 0.3,
        "w64": torch.rand(3, 3, 3, generator=g) < 0.5,
        "wbf16": torch.rand(17, generator=g) < 0.5,
        "empty_mask": torch.zeros(4, 4, dtype=torch.bool),
        "full_mask": torch.ones(9, dtype=torch.bool),
    }
    masks["w32"][0, 0] = True
    return named, masks


def expected(named, masks, name) -> torch.Tensor:
    flat = named[name].reshape(-1)
    return flat if name not in masks else torch.where(masks[name].reshape(-1), flat, torch.zeros_like(flat))


@pytest.fixture
def saved(tmp_path):
    named, masks = ticket()
    path = tmp_path / "ticket_1"
    save_sharded(path, replicated_pieces(named, masks), {"kind": "ticket", "index": 1})
    return path, named, masks


def test_round_trip_whole_and_ranges(saved):
    path, named, masks = saved
    got = load_sharded(path)
    assert set(got) == set(named)
    for name, tensor in named.items():
        values, mask = got[name]
        assert values.dtype == tensor.dtype and values.shape == (tensor.numel(),), name
        assert torch.equal(values, expected(named, masks, name)), name
        if name in masks:
            assert torch.equal(mask, masks[name].reshape(-1)), name
        else:
            assert mask is None, name
    assert torch.signbit(got["w32"][0][0]) and got["counter"][0].item() == 12345678901
    for name in ("w32", "w64", "wbf16", "empty_mask", "full_mask", "counts"):
        n = named[name].numel()
        for offset, numel in ((0, n), (1, n - 2), (n // 2, 1), (n - 3, 3), (2, 0)):
            values, mask = load_sharded(path, {name: (offset, numel)})[name]
            assert torch.equal(values, expected(named, masks, name)[offset : offset + numel]), (name, offset)
            if name in masks:
                assert torch.equal(mask, masks[name].reshape(-1)[offset : offset + numel]), (name, offset)
    manifest = read_manifest(path)
    assert manifest["meta"] == {"kind": "ticket", "index": 1}
    assert manifest["tensors"]["counter"] == {"shape": [], "dtype": "int64", "masked": False, "numel": 1}
    assert manifest["tensors"]["wbf16"]["dtype"] == "bfloat16" and manifest["tensors"]["wbf16"]["masked"]
    assert verify_sharded(path) == []


def test_only_active_values_and_packed_bits_are_stored(saved):
    path, named, masks = saved
    raw = (path / SHARD).read_bytes()
    entries = {e["tensor"]: e for e in read_manifest(path)["files"][0]["entries"]}
    assert "nothing" not in entries  # zero elements: nothing stored
    for name, mask in masks.items():
        e, flat = entries[name], mask.reshape(-1).tolist()
        itemsize = named[name].element_size()
        assert e["active"] == sum(flat) and e["values"][1] == e["active"] * itemsize
        start, nbytes = e["mask"]
        assert nbytes == (len(flat) + 7) // 8
        # np.packbits order, written out by hand: element 8*i + j is bit (7 - j) of byte i
        want = bytes(
            sum(int(b) << (7 - j) for j, b in enumerate(flat[i : i + 8])) for i in range(0, len(flat), 8)
        )
        assert raw[start : start + nbytes] == want, name
        active = named[name].reshape(-1)[mask.reshape(-1)]
        if e["active"]:
            stored = torch.frombuffer(bytearray(raw[e["values"][0] : sum(e["values"])]), dtype=active.dtype)
            assert torch.equal(stored, active), name


def test_inactive_values_are_not_stored_and_read_back_as_zero(tmp_path):
    w = torch.full((1000,), 7.0)
    mask = torch.arange(1000) % 10 == 0
    save_sharded(tmp_path / "t", replicated_pieces({"w": w}, {"w": mask}), {})
    values, _ = load_sharded(tmp_path / "t")["w"]
    assert values.sum() == 700 and torch.equal(values != 0, mask)
    assert (tmp_path / "t" / SHARD).stat().st_size < 1000 * 4 * 0.2


def spoil(path, how: str) -> None:
    file = path / SHARD
    if how == "corrupt":
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        file.write_bytes(bytes(raw))
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[:-10])
    else:
        file.unlink()


@pytest.mark.parametrize(
    "how, message",
    [("corrupt", "SHA-256 mismatch"), ("truncated", "truncated or replaced"), ("missing", "missing")],
)
def test_damaged_file_is_refused_naming_it(saved, how, message):
    path, *_ = saved
    spoil(path, how)
    with pytest.raises(CheckpointError, match=f"{SHARD}: .*{message}") as info:
        load_sharded(path)
    assert str(path / SHARD) in str(info.value) and "re-create" in str(info.value)
    problems = verify_sharded(path)
    assert len(problems) == 1 and str(path / SHARD) in problems[0]


def test_missing_or_edited_manifest_is_refused(saved):
    path, *_ = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][0]["entries"][0]["active"] += 1  # a hand edit the digest must catch
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json: corrupt \(its digest"):
        load_sharded(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: corrupt, not JSON"):
        read_manifest(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=f"{path / 'manifest.json'}: missing"):
        load_sharded(path)
    assert "missing" in verify_sharded(path)[0]


def test_missing_tensor_names_are_listed(saved):
    path, *_ = saved
    with pytest.raises(CheckpointError, match=r"no tensor\(s\) \['a.weight', 'b.bias'\]"):
        load_sharded(path, {"w32": (0, 1), "b.bias": (0, 1), "a.weight": (0, 1)})
    with pytest.raises(CheckpointError, match="outside its 30 elements"):
        load_sharded(path, {"w32": (25, 6)})


@pytest.mark.parametrize("existing", ["full", "empty", "file"])
def test_existing_path_is_never_overwritten(saved, existing):
    path, named, masks = saved
    target = path.parent / existing
    if existing == "full":
        target = path
    elif existing == "empty":
        target.mkdir()
    else:
        target.write_text("keep me")
    before = (
        sorted((p.name, p.read_bytes()) for p in target.iterdir()) if target.is_dir() else target.read_text()
    )
    with pytest.raises(CheckpointError, match="already exists; a checkpoint is never overwritten"):
        save_sharded(target, replicated_pieces({"x": torch.ones(3)}, {}), {})
    after = (
        sorted((p.name, p.read_bytes()) for p in target.iterdir()) if target.is_dir() else target.read_text()
    )
    assert after == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(
    "pieces, meta, message",
    [
        ({"w": LocalPiece((4,), 0, torch.ones(2))}, {}, r"'w': flat range \[2, 4\) is held by no file"),
        ({"w": LocalPiece((4,), 3, torch.ones(2))}, {}, r"run \[3, 3\+2\) lies outside its 4 elements"),
        ({"w": LocalPiece((4,), 0, torch.ones(4), torch.ones(3, dtype=torch.bool))}, {}, "mask must be bool"),
        ({"w": LocalPiece((4,), 0, torch.ones(2), replicated=True)}, {}, "replicated=True needs the whole"),
        ({"w": LocalPiece((4,), 0, torch.ones(4))}, {"bad": object()}, "not JSON serializable"),
    ],
)
def test_bad_pieces_are_refused_and_nothing_is_published(tmp_path, pieces, meta, message):
    with pytest.raises(CheckpointError, match=message):
        save_sharded(tmp_path / "out", pieces, meta)
    assert list(tmp_path.iterdir()) == []
