"""Data module: split loading, keyed augmentation, rank-independent sampling (real CIFAR-10 data)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import itertools
import shutil
from pathlib import Path

import datasets as hf
import numpy as np
import pytest
import torch

from sparse_sup.data import (
    BUNDLED_DIR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    EvalShardSampler,
    GlobalBatchSampler,
    ImageClassificationDataset,
    KeyedMixup,
    TrainInput,
    crop_flip_params,
    hash32,
    load_split_datasets,
    make_loader,
    mix32,
    sample_key,
)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return load_split_datasets("bundled", cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(scope="module")
def small_train(bundled):
    return bundled.train.select(range(256))


# ----------------------------------------------------------------------------- keys


def test_mix32_and_hash32_agree():
    salt = mix32(7, 3)
    x = torch.tensor([0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 5, -1, -(2**33)], dtype=torch.int64)
    h = hash32(x, salt)
    assert h.dtype == torch.int64 and bool(((h >= 0) & (h < 2**32)).all())
    assert h.tolist() == [mix32(7, 3, v) for v in x.tolist()]
    assert sample_key(7, 3, 12345) == h[2].item()
    assert len(set(hash32(torch.arange(10000), salt).tolist())) > 9980  # practically no collisions


# ----------------------------------------------------------------------------- loading


def test_bundled_split(bundled):
    assert BUNDLED_DIR.is_dir() and BUNDLED_DIR.is_relative_to(
        Path(__file__).resolve().parents[2] / "sparse_sup"
    )
    assert (len(bundled.train), len(bundled.eval), bundled.num_classes) == (10000, 2000, 10)
    assert bundled.class_names[0] == "airplane" and bundled.class_names[-1] == "truck"
    assert bundled.train.column_names == ["image", "label"] == bundled.eval.column_names


def test_imagefolder_from_real_images(bundled, tmp_path):
    source = bundled.eval.select(range(200))
    labels = np.asarray(source["label"])
    picks = {"train": [], "test": []}
    for cls in (3, 5):  # cat, dog
        idx = np.flatnonzero(labels == cls)[:5].tolist()
        picks["train"] += idx[:3]
        picks["test"] += idx[3:5]
    for split, idx in picks.items():
        for i in idx:
            folder = tmp_path / "imgs" / split / bundled.class_names[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            source[i]["image"].convert("RGB").save(folder / f"{i:04d}.png")

    split = load_split_datasets(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    assert split.class_names == ["cat", "dog"] and split.num_classes == 2
    assert (len(split.train), len(split.eval)) == (6, 4)
    ds = ImageClassificationDataset(split.train, train=False)
    files = split.train.cast_column("image", hf.Image(decode=False))["image"]
    for file, label in zip(files, ds.labels.tolist(), strict=True):
        i = int(Path(file["path"]).stem)  # files are named by their index in `source`
        assert split.class_names[label] == bundled.class_names[labels[i]]
    # PNG is lossless: the in-memory images are the original pixels
    originals = {np.asarray(source[i]["image"].convert("RGB")).tobytes() for i in picks["train"]}
    assert {ds.images[j].permute(1, 2, 0).numpy().tobytes() for j in range(len(ds))} == originals


def test_parquet_folder_with_split_subfolders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "pq" / split).mkdir(parents=True)
        shutil.copy(BUNDLED_DIR / "test-00000-of-00001.parquet", tmp_path / "pq" / split / "part-0.parquet")
    split = load_split_datasets(str(tmp_path / "pq"), image_column="img", cache_dir=str(tmp_path / "cache"))
    assert (len(split.train), len(split.eval), split.num_classes) == (2000, 2000, 10)


def test_undetectable_columns_are_listed(tmp_path):
    for split in ("train", "test"):
        hf.Dataset.from_dict({"foo": [1, 2], "bar": [0, 1]}).to_parquet(tmp_path / f"{split}.parquet")
    with pytest.raises(ValueError, match=r"cannot detect the image column among \['foo', 'bar'\]"):
        load_split_datasets(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_split_datasets(str(missing))
    assert str(missing) in str(err.value)


def test_uncached_hub_name_explains_offline(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_split_datasets("sparse-sup-tests/not-a-cached-dataset", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "'sparse-sup-tests/not-a-cached-dataset'" in msg
    assert "not in the local Hugging Face datasets cache" in msg and str(tmp_path) in msg
    assert "offline" in msg and "local folder" in msg and "connected machine" in msg


def test_cached_hub_dataset_loads_offline(tmp_path):
    """Build the hub cache layout (<ns>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow)."""
    files = {s: str(BUNDLED_DIR / "test-00000-of-00001.parquet") for s in ("train", "test")}
    hf.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
    (built,) = (tmp_path / "build" / "parquet").glob("*/*/*/dataset_info.json")
    target = tmp_path / "cache" / "someone___tiny_cifar" / "default" / "0.0.0" / built.parent.name
    target.mkdir(parents=True)
    shutil.copy(built, target)
    for split in ("train", "test"):
        shutil.copy(built.parent / f"parquet-{split}.arrow", target / f"tiny_cifar-{split}.arrow")
    split = load_split_datasets("someone/tiny_cifar", cache_dir=str(tmp_path / "cache"))
    assert (len(split.train), len(split.eval), split.num_classes) == (2000, 2000, 10)


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_global_batches_split_exactly_over_ranks_and_accum(world, accum):
    n, b, seed = 203, 32, 5
    samplers = [GlobalBatchSampler(n, b, world, r, accum, seed) for r in range(world)]
    assert samplers[0].steps_per_epoch == n // b
    perms = {}
    for epoch in (0, 1):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == s.steps_per_epoch * accum
            assert all(len(mb) == b // (world * accum) and {e for e, _ in mb} == {epoch} for mb in batches)
            per_rank.append([i for mb in batches for _, i in mb])
        perm = samplers[0].permutation(epoch)
        assert all(torch.equal(perm, s.permutation(epoch)) for s in samplers)
        assert sorted(perm.tolist()) == list(range(n))
        per_step = b // world
        for step in range(n // b):
            union = list(
                itertools.chain.from_iterable(
                    ids[step * per_step : (step + 1) * per_step] for ids in per_rank
                )
            )
            assert union == perm[step * b : (step + 1) * b].tolist() == samplers[0].global_batch(epoch, step)
        perms[epoch] = perm
    assert not torch.equal(perms[0], perms[1])
    # batch composition does not depend on world size or accumulation
    assert perms[0].tolist() == GlobalBatchSampler(n, 8, seed=seed).permutation(0).tolist()


def test_global_sampler_resume_and_errors():
    s = GlobalBatchSampler(100, 10, world_size=2, rank=1, grad_accum_steps=1, seed=0)
    full = list(s)
    s.set_epoch(0, start_step=7)
    assert list(s) == full[7:] and len(s) == 3
    with pytest.raises(ValueError, match=r"global_batch_size=30 .* world_size\*grad_accum_steps=4\*2=8"):
        GlobalBatchSampler(100, 30, world_size=4, rank=0, grad_accum_steps=2)
    wrap = GlobalBatchSampler(25, 10, drop_last=False, seed=1)
    assert wrap.steps_per_epoch == 3
    perm = wrap.permutation(0).tolist()
    assert wrap.global_batch(0, 2) == perm[20:] + perm[:5]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_each_index_once(world):
    n = 1001
    seen = []
    for r in range(world):
        s = EvalShardSampler(n, 64, world, r)
        batches = list(s)
        assert len(batches) == len(s) and all(0 < len(x) <= 64 for x in batches)
        seen += [i for batch in batches for _, i in batch]
    assert sorted(seen) == list(range(n))


# ----------------------------------------------------------------------------- augmentation


def test_cifar_augmentation_is_keyed(small_train):
    a = ImageClassificationDataset(small_train, train=True, seed=3)
    b = ImageClassificationDataset(small_train, train=True, seed=3)
    keys = [(2, i) for i in range(0, 256, 5)]
    xa, ya = a.get_batch(keys)
    xb, yb = b.get_batch(keys)
    assert xa.shape == (len(keys), 3, 32, 32) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for j, key in enumerate(keys):  # per-item path == batched path
        x, y = a[key]
        assert torch.equal(x, xa[j]) and y == ya[j].item()
    xc, _ = a.get_batch([(3, i) for _, i in keys])
    changed = [not torch.equal(xa[j], xc[j]) for j in range(len(keys))]
    assert sum(changed) > len(keys) // 2
    mixed = keys[:3] + [(3, i) for _, i in keys[3:6]]  # epochs may differ within a batch
    assert torch.equal(a.get_batch(mixed)[0], torch.cat([xa[:3], xc[3:6]]))


def test_cifar_crop_matches_hand_computation(small_train):
    seed, epoch, pad = 11, 4, 4
    ds = ImageClassificationDataset(small_train, train=True, seed=seed, padding=pad)
    # a sample whose crop shows the top padding rows and is flipped
    params = {i: crop_flip_params(sample_key(seed, epoch, i), pad) for i in range(256)}
    index = next(i for i, (top, _, flip) in params.items() if top <= 1 and flip)
    top, left, flip = crop_flip_params(sample_key(seed, epoch, index), pad)
    src = np.asarray(small_train[index]["image"].convert("RGB")).astype(np.float64)  # H,W,C
    expected = np.zeros((3, 32, 32))
    for y in range(32):
        for x in range(32):
            sy, sx = y + top - pad, (31 - x if flip else x) + left - pad
            if 0 <= sy < 32 and 0 <= sx < 32:
                expected[:, y, x] = src[sy, sx]
    mean = np.asarray(CIFAR10_MEAN)[:, None, None]
    std = np.asarray(CIFAR10_STD)[:, None, None]
    out = ds[(epoch, index)][0].double().numpy()
    np.testing.assert_allclose(out, (expected / 255 - mean) / std, atol=1e-5)
    raw = (out * std + mean) * 255  # undo normalisation: padding rows are zeros
    np.testing.assert_allclose(raw[:, : pad - top], 0, atol=1e-3)


def test_cifar_eval_is_plain_normalisation(bundled):
    ds = ImageClassificationDataset(bundled.eval.select(range(8)), train=False)
    img = torch.from_numpy(np.array(bundled.eval[3]["image"].convert("RGB"))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(ds[(9, 3)][0], (img - mean) / std, atol=1e-6)
    assert torch.equal(ds[(0, 3)][0], ds[(9, 3)][0])


def test_in_memory_loader(small_train):
    ds = ImageClassificationDataset(small_train, train=True, seed=0)
    sampler = GlobalBatchSampler(len(ds), 64, world_size=2, rank=1, grad_accum_steps=2, seed=0)
    loader = make_loader(ds, sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 8 and all(x.shape == (16, 3, 32, 32) for x, _ in batches)
    sampler.set_epoch(0)
    assert [y.tolist() for _, y in batches] == [ds.labels[[i for _, i in k]].tolist() for k in sampler]


def test_imagenet_style_keyed_and_rng_neutral(small_train):
    sub = small_train.select(range(12))
    ds = ImageClassificationDataset(sub, train=True, seed=1, style="imagenet", image_size=48)
    assert not ds.in_memory
    state = torch.get_rng_state()
    x1, y1 = ds.get_batch([(0, i) for i in range(12)])
    assert torch.equal(torch.get_rng_state(), state)
    assert x1.shape == (12, 3, 48, 48) and y1.tolist() == ds.labels.tolist()
    other = ImageClassificationDataset(sub, train=True, seed=1, style="imagenet", image_size=48)
    assert torch.equal(other[(0, 5)][0], x1[5])
    x2, _ = ds.get_batch([(1, i) for i in range(12)])
    assert any(not torch.equal(x1[i], x2[i]) for i in range(12))
    ev = ImageClassificationDataset(sub, train=False, style="imagenet", image_size=48)
    assert ev[(0, 2)][0].shape == (3, 48, 48) and torch.equal(ev[(0, 2)][0], ev[(5, 2)][0])
    loader = make_loader(ds, [[(0, i) for i in range(j, j + 4)] for j in (0, 4, 8)], num_workers=0)
    assert torch.equal(torch.cat([x for x, _ in loader]), x1)


def test_worker_loader_matches_main_process(small_train):
    ds = ImageClassificationDataset(
        small_train.select(range(16)), train=True, seed=2, style="imagenet", image_size=40
    )
    sampler = GlobalBatchSampler(16, 8, world_size=1, rank=0, grad_accum_steps=2, seed=2)
    sampler.set_epoch(3)
    xs, ys = zip(*make_loader(ds, sampler, num_workers=2), strict=True)
    keys = list(sampler)
    assert all(torch.equal(x, ds.get_batch(k)[0]) for x, k in zip(xs, keys, strict=True))
    assert torch.cat(ys).tolist() == ds.labels[[i for k in keys for _, i in k]].tolist()


# ----------------------------------------------------------------------------- timm pipeline


def _global_batches(ds, world, accum, workers, steps, mixup, batch=8, seed=5):
    """The device-side (here: CPU) training input of ``steps`` optimizer steps, each rank's
    micro-batches put back in global order (rank r, micro-batch a is slice r*A + a)."""
    inp = TrainInput(ds, num_classes=10, label_smoothing=0.1, mixup=mixup, cutmix=mixup)
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(len(ds), batch, world, rank, accum, seed)
        sampler.set_epoch(1)
        loader = iter(inp.loader(sampler, workers))
        per_rank.append(
            [
                [inp.to_device(next(loader), torch.device("cpu"), torch.float32, s) for _ in range(accum)]
                for s in range(steps)
            ]
        )
    out = []
    for s in range(steps):
        parts = [per_rank[r][s][a] for r in range(world) for a in range(accum)]
        out.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    return out


@pytest.mark.parametrize("style", ["imagenet", "cifar"])
def test_randaugment_erasing_mixup_independent_of_world_size_and_workers(small_train, style):
    """RandAugment + colour jitter + random erasing + mixup/cutmix: the same global batches at
    world size 1 (no workers) and world size 2 x accumulation 2 (2 workers per rank)."""
    aug = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, train=True, seed=5)
    ds = ImageClassificationDataset(small_train.select(range(32)), style=style, image_size=32, **aug)
    assert ds.in_memory == (style == "cifar")
    state = (torch.get_rng_state(), np.random.get_state()[1].copy())
    ref = _global_batches(ds, world=1, accum=1, workers=0, steps=3, mixup=0.8)
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    got = _global_batches(ds, world=2, accum=2, workers=2 if style == "imagenet" else 0, steps=3, mixup=0.8)
    host = next(
        iter(TrainInput(ds, 10).loader([[(0, i) for i in range(4)]], 2 if style == "imagenet" else 0))
    )
    assert host[0].dtype == torch.uint8 and host[0].shape == (4, 3, 32, 32)  # workers ship uint8
    assert host[2].tolist() == [sample_key(5, 0, i) for i in range(4)]
    for (x1, y1), (x2, y2) in zip(ref, got, strict=True):
        assert x1.shape == (8, 3, 32, 32) and y1.shape == (8, 10)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the draws are real: soft targets are mixed (two classes + smoothing), some pixel is erased
    # noise (|z| beyond any normalised 8-bit value) and the augmentation differs from the plain one
    assert any((y > 0.02).sum(1).max() >= 2 for _, y in ref)
    assert any(x.abs().amax() > 2.8 for x, _ in ref) or style == "cifar"
    plain = ImageClassificationDataset(
        small_train.select(range(32)), style=style, image_size=32, train=True, seed=5
    )
    assert not torch.equal(_global_batches(plain, 1, 1, 0, 1, mixup=0.0)[0][0], ref[0][0])


def test_device_finish_equals_host_float_path(small_train):
    """The uint8 host batch finished on the "device" (crop/flip, normalise) is bit-identical to the
    float API (evaluation, BN recalibration), and the mixup pairs are fixed positions 2k, 2k+1."""
    ds = ImageClassificationDataset(small_train, train=True, seed=3, re_prob=0.25)
    keys = [(2, i) for i in range(0, 64, 4)]
    images, labels, skeys = ds.raw_batch(keys)
    assert images.dtype == torch.uint8 and skeys.tolist() == [sample_key(3, e, i) for e, i in keys]
    x, y = TrainInput(ds, 10).to_device((images, labels, skeys), torch.device("cpu"), torch.float32, 0)
    assert torch.equal(x, ds.get_batch(keys)[0]) and torch.equal(y, labels)
    mix = KeyedMixup(mixup=1.0, cutmix=0.0, num_classes=10, label_smoothing=0.0, seed=3)
    xm, ym = mix(x.clone(), labels, step=7)
    k = next(k for k in range(0, len(keys), 2) if labels[k] != labels[k + 1])  # a pair of two classes
    lam = ym[k, labels[k]].item()
    assert 0 < lam < 1 and ym[k + 1, labels[k + 1]].item() == pytest.approx(lam)
    assert torch.allclose(xm[k], lam * x[k] + (1 - lam) * x[k + 1], atol=1e-5)
    assert torch.allclose(xm[k + 1], lam * x[k + 1] + (1 - lam) * x[k], atol=1e-5)
    assert torch.equal(mix(x.clone(), labels, step=7)[0], xm)
    assert not torch.equal(mix(x.clone(), labels, step=8)[0], xm)


def test_timm_policy_posterize_to_zero_bits_does_not_crash():
    """rand-m9-mstd0.5 reaches PosterizeIncreasing at magnitude 10 (0 bits), which Pillow >= 11
    refuses; the policy built through TimmTransform keeps the old meaning (a black image)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from sparse_sup.data import TimmTransform

    TimmTransform(True, 32, "imagenet", auto_augment="rand-m9-mstd0.5-inc1")
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)).max() == 0
    assert np.asarray(AugmentOp("Posterize", prob=1.0, magnitude=10)(image)).max() == 192  # 4 bits kept


def test_keyed_erasing_is_timm_random_erasing_under_each_sample_key():
    """KeyedErasing == timm's RandomErasing called per sample inside keyed_rng(its key): the shortcut
    that skips spared samples changes nothing, and about re_prob of the samples are erased."""
    from timm.data.random_erasing import RandomErasing

    from sparse_sup.data import KeyedErasing, keyed_rng
    from sparse_sup.data.transforms import _ERASE_SALT

    images = torch.randn(64, 3, 16, 16)
    keys = torch.arange(1000, 1064)
    got = KeyedErasing(0.25)(images.clone(), keys)
    timm_erase = RandomErasing(0.25, mode="pixel", device="cpu")
    expected = images.clone()
    for image, key in zip(expected, keys.tolist(), strict=True):
        with keyed_rng(mix32(key, _ERASE_SALT)):
            timm_erase(image)
    assert torch.equal(got, expected)
    erased = sum(not torch.equal(a, b) for a, b in zip(got, images, strict=True))
    assert 5 <= erased <= 30  # ~16 of 64
