"""BN recalibration batches: drawn through the training transform with keys of their own
(seed, recalibration counter, sample index), the same batches whatever the world size."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from sparse_sup.config import load_config
from sparse_sup.data import (
    ImageClassificationDataset,
    crop_flip,
    load_split_datasets,
    mix32,
    recalibration_epoch,
    sample_key,
)
from sparse_sup.tickets import Discard, recalibrate_batchnorm
from sparse_sup.train.evaluate import recalibration_batches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 7
CPU = torch.device("cpu")


class RankOf:
    """The ``Collectives`` view of one rank among ``world_size`` (only world_size/rank are read)."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        raise AssertionError("recalibration_batches must not communicate")


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    splits = load_split_datasets("bundled", cache_dir=str(tmp_path_factory.mktemp("hf_cache")))
    return ImageClassificationDataset(splits.train.select(range(200)), train=True, seed=SEED)


def _expected(ds: ImageClassificationDataset, counter: int, batch_size: int) -> list[torch.Tensor]:
    """What the training transform produces, sample by sample, for the recalibration keys."""
    epoch = recalibration_epoch(counter)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(mix32(SEED, epoch)))
    out = []
    for j in range(len(ds) // batch_size):
        idx = order[j * batch_size : (j + 1) * batch_size].tolist()
        images = [crop_flip(ds.images[i], sample_key(SEED, epoch, i), ds.padding) for i in idx]
        out.append(ds.normalize(torch.stack(images)))
    return out


def test_bn_sees_exactly_the_training_transform_of_its_keys(train_set):
    expected = _expected(train_set, counter=2, batch_size=32)
    assert len(expected) == 6
    seen = []
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    batches = recalibration_batches(train_set, 32, None, SEED, RankOf(1, 0), CPU, torch.float32, counter=2)
    assert recalibrate_batchnorm(model, batches) == 2
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)
    everything = torch.cat(expected).double()
    torch.testing.assert_close(model[0].running_mean.double(), everything.mean((0, 2, 3)))
    # augmented: not the clean images, and not a training epoch's crops of the same samples
    clean = ImageClassificationDataset.__new__(ImageClassificationDataset)
    clean.__dict__.update(train_set.__dict__, train=False)
    epoch = recalibration_epoch(2)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(mix32(SEED, epoch)))[:32]
    assert not torch.equal(seen[0], clean.get_batch([(0, int(i)) for i in order])[0])
    assert not torch.equal(seen[0], train_set.get_batch([(0, int(i)) for i in order])[0])
    # each recalibration pass (counter) draws augmentations of its own
    other = next(
        recalibration_batches(train_set, 32, None, SEED, RankOf(1, 0), CPU, torch.float32, counter=3)
    )
    assert not torch.equal(other, seen[0])


@pytest.mark.parametrize("lockstep", [False, True])
def test_batches_do_not_depend_on_world_size(train_set, lockstep):
    reference = list(
        recalibration_batches(train_set, 32, 5, SEED, RankOf(1, 0), CPU, torch.float32, counter=1)
    )
    assert len(reference) == 5
    for world in (2, 3):
        by_batch = {}
        counts = []
        for rank in range(world):
            items = list(
                recalibration_batches(
                    train_set, 32, 5, SEED, RankOf(world, rank), CPU, torch.float32, lockstep, counter=1
                )
            )
            counts.append(len(items))
            real = [x for x in items if not isinstance(x, Discard)]
            for i, x in enumerate(real):  # rank r holds batches r, r+W, ...
                by_batch[rank + i * world] = x
        assert sorted(by_batch) == list(range(5))
        for j, x in by_batch.items():
            assert torch.equal(x, reference[j])
        if lockstep:
            assert len(set(counts)) == 1  # every rank runs the same number of forwards


def test_recalibration_counter_must_be_non_negative():
    with pytest.raises(ValueError, match="counter"):
        recalibration_epoch(-1)


@pytest.mark.parametrize("augment", [True, False])
def test_prepare_picks_the_recalibration_set(augment, tmp_path):
    from sparse_sup.train.setup import prepare

    config = load_config(
        os.path.join(ROOT, "configs", "tiny-test.yaml"),
        [f"--experiment.output_dir={tmp_path / 'run'}", f"--tickets.bn_recal_augment={str(augment).lower()}"],
    )
    prepared = prepare(config)
    assert prepared.bn_set.train is augment
    assert prepared.train_set.train is True
    assert len(prepared.bn_set) == len(prepared.train_set)
    assert not (tmp_path / "run").exists()  # nothing written by prepare


def test_workers_decode_the_same_batches(tmp_path):
    """A dataset decoded per sample (here: 72 px images, the lazy path) is recalibrated from
    ``data.num_workers`` DataLoader workers, with the batches the main process would draw."""
    splits = load_split_datasets("bundled", cache_dir=str(tmp_path / "hf_cache"))
    lazy = ImageClassificationDataset(splits.train.select(range(64)), train=True, seed=SEED, image_size=72)
    assert not lazy.in_memory

    def batches(workers: int) -> list[torch.Tensor]:
        args = (lazy, 16, None, SEED, RankOf(1, 0), CPU, torch.float32)
        return list(recalibration_batches(*args, counter=1, num_workers=workers))

    main_process, workers = batches(0), batches(2)
    assert len(main_process) == 4 and all(x.shape == (16, 3, 72, 72) for x in main_process)
    assert all(torch.equal(a, b) for a, b in zip(workers, main_process, strict=True))
