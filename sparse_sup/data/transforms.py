"""Augmentations whose randomness comes from a per-sample key, not from global RNG state.

The key is ``sample_key(seed, epoch, index)``, so a sample is augmented the same way whatever the
world size, worker count or batch it lands in.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from ..config.errors import ConfigError
from .keys import mix32

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# per-dataset (mean, std), recognised from data.source; order matters: "cifar100" before "cifar10"
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def dataset_normalization(source: str, style: str) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """(which, mean, std) for a data source: the statistics of the dataset it names (``bundled`` is
    CIFAR-10; a path or hub name containing cifar100 / cifar10 / imagenet, ignoring case and
    punctuation), else those of the style's reference set (cifar: CIFAR-10, imagenet: ImageNet)."""
    plain = "".join(ch for ch in source.lower() if ch.isalnum())
    if source == "bundled":
        plain = "cifar10"
    for name, (mean, std) in NORMALIZATION.items():
        if name in plain:
            return name, mean, std
    fallback = "cifar10" if style == "cifar" else "imagenet"
    return f"{fallback} (default for style={style})", *NORMALIZATION[fallback]


def crop_flip_params(key: int, padding: int) -> tuple[int, int, bool]:
    """(top, left, flip) of a padded random crop, read from the digits of ``key``."""
    n = 2 * padding + 1
    return key % n, (key // n) % n, bool((key // (n * n)) % 2)


def crop_flip(image: torch.Tensor, key: int, padding: int = 4) -> torch.Tensor:
    """Zero-pad a uint8 [C,H,W] image by ``padding``, crop back to [C,H,W], maybe flip horizontally."""
    _, h, w = image.shape
    top, left, flip = crop_flip_params(key, padding)
    out = F.pad(image, (padding,) * 4)[:, top : top + h, left : left + w]
    return out.flip(-1) if flip else out


def crop_flip_batch(images: torch.Tensor, keys: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Batched ``crop_flip`` of uint8 [B,C,H,W] with int64 keys [B], as one gather."""
    b, c, h, w = images.shape
    n = 2 * padding + 1
    keys = keys.to(images.device, non_blocking=True)  # images may live on the GPU; keys pinned
    top, left, flip = keys % n, (keys // n) % n, (keys // (n * n)) % 2 == 1
    rows = top[:, None] + torch.arange(h, device=images.device)  # [B,H] rows of the padded image
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # [B,W]
    flat = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]  # [B,H,W]
    padded = F.pad(images, (padding,) * 4).flatten(2)
    return padded.gather(2, flat.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class Normalize:
    """uint8 [..., C, H, W] -> float32 ``(x/255 - mean) / std``, computed as ``x * 1/(255 std) -
    mean/std`` (two in-place passes after the cast instead of three; within an ulp of the other order)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
        self.mean, self.std = mean_t.float(), std_t.float()
        self.scale, self.shift = (1 / (255 * std_t)).float(), (-mean_t / std_t).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.device != x.device:  # images kept on the GPU
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
        return x.to(torch.float32).mul_(self.scale).add_(self.shift)


@contextlib.contextmanager
def keyed_rng(key: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's global RNG and torch's CPU generator (and ``device``'s, if
    it is an accelerator) with ``key``; restore all of them afterwards. timm's transforms draw from
    all three, so a transform called inside is a pure function of the key. In a DataLoader worker
    nothing else draws from them, so the (costly: ~0.1 ms) save and restore are left out there."""
    key &= 0xFFFFFFFF
    accel = device is not None and device.type != "cpu"
    if not accel and torch.utils.data.get_worker_info() is not None:
        random.seed(key)
        np.random.seed(key)
        torch.default_generator.manual_seed(key)
        yield
        return
    py, np_state = random.getstate(), np.random.get_state()
    module = torch.get_device_module(device.type) if accel else None
    index = (device.index if device.index is not None else module.current_device()) if accel else None
    with torch.random.fork_rng(devices=[index] if accel else [], device_type=device.type if accel else None):
        random.seed(key)
        np.random.seed(key)
        torch.default_generator.manual_seed(key)
        if accel:
            module.default_generators[index].manual_seed(key)  # no host sync: seed and offset only
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _policy(auto_augment: str | None, color_jitter: float) -> dict:
    return {
        "auto_augment": auto_augment,
        "color_jitter": color_jitter or None,  # timm's ColorJitter(0, 0, 0) would still draw
    }


def _posterize_zero_bits_is_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize with Pillow >= 11: ``ImageOps.posterize(img, 0)`` now raises, where it used
    to keep no bit (a black image). timm's ``PosterizeIncreasing`` reaches 0 bits at magnitude 10,
    which ``rand-m9-mstd0.5`` draws; keep the old meaning instead of crashing a worker."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


_TIMM_POSTERIZE = None


def _build(**kwargs):
    global _TIMM_POSTERIZE
    import timm.data
    from timm.data import auto_augment as aa

    if _TIMM_POSTERIZE is None:  # once: every posterize op of timm's policies
        _TIMM_POSTERIZE = aa.posterize
        for name, fn in list(aa.NAME_TO_OP.items()):
            if fn is aa.posterize:
                aa.NAME_TO_OP[name] = _posterize_zero_bits_is_black
    try:
        return timm.data.create_transform(**kwargs)
    except (AssertionError, KeyError, ValueError) as err:
        raise ConfigError(
            f"data.auto_augment={kwargs.get('auto_augment')!r} is not a timm policy: {err!r}"
        ) from None


class TimmTransform:
    """``timm.data.create_transform`` in prefetcher form: PIL -> uint8 [3,H,W]; normalisation and
    random erasing follow on the device (``KeyedErasing``). Training draws run inside
    ``keyed_rng(key)``. ``imagenet`` style: RandomResizedCrop + flip + policy (train) or
    Resize(size/crop_pct) + CenterCrop (eval); ``cifar`` style: only the policy part (auto-augment,
    colour jitter) here, the padded crop and flip happen batched (``crop_flip_batch``)."""

    def __init__(
        self,
        train: bool,
        size: int,
        style: str = "imagenet",
        auto_augment: str | None = None,
        color_jitter: float = 0.0,
        crop_pct: float | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        self.train = train
        common = dict(input_size=size, interpolation=interpolation, use_prefetcher=True)
        if style == "imagenet":
            extra = _policy(auto_augment, color_jitter) if train else {"crop_pct": crop_pct}
            self.transform = _build(is_training=train, **common, **extra)
        elif train and (auto_augment or color_jitter):
            _, secondary, final = _build(
                is_training=True, separate=True, **common, **_policy(auto_augment, color_jitter)
            )
            self.transform = T.Compose([*secondary.transforms, *final.transforms])
        else:
            self.transform = None  # cifar without a policy: nothing per sample

    def __call__(self, image: Image.Image, key: int) -> torch.Tensor:
        if not self.train:
            return self.transform(image)
        with keyed_rng(key):
            return self.transform(image)


class KeyedErasing:
    """timm ``RandomErasing`` (per-pixel noise, one box) on a normalised float batch, each sample
    drawn from its own key (inside ``keyed_rng``), on whatever device the batch lives."""

    def __init__(self, probability: float, mode: str = "pixel") -> None:
        self.probability, self.mode = probability, mode
        self._by_device: dict[torch.device, object] = {}

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        from timm.data.random_erasing import RandomErasing

        device = images.device
        if device not in self._by_device:
            self._by_device[device] = RandomErasing(self.probability, mode=self.mode, device=device)
        erase = self._by_device[device]
        for image, key in zip(images, keys.tolist(), strict=True):
            key = mix32(key, _ERASE_SALT)
            # timm's first draw decides whether to erase at all: read it from a private generator
            # seeded alike (the same value) and skip the costlier keyed_rng for the samples it spares
            if random.Random(key).random() > self.probability:
                continue
            with keyed_rng(key, device):
                erase(image)  # in place on the [C,H,W] view
        return images


_ERASE_SALT = 0x45524153  # "ERAS": erasing draws differ from the transform's, same sample key
