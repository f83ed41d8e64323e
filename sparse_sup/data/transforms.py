"""Augmentations whose randomness comes from a per-sample key, not from global RNG state.

The key is ``sample_key(seed, epoch, index)``, so a sample is augmented the same way whatever the
world size, worker count or batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

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
    keys = keys.to(images.device)  # images may live on the GPU (data kept on the device)
    top, left, flip = keys % n, (keys // n) % n, (keys // (n * n)) % 2 == 1
    rows = top[:, None] + torch.arange(h, device=images.device)  # [B,H] rows of the padded image
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # [B,W]
    flat = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]  # [B,H,W]
    padded = F.pad(images, (padding,) * 4).flatten(2)
    return padded.gather(2, flat.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class Normalize:
    """uint8 [..., C, H, W] -> float32 ``(x/255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:  # images kept on the GPU
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)


class ImageNetTransform:
    """RandomResizedCrop+flip (train) or Resize(size/0.875)+CenterCrop (eval) on PIL images.

    torchvision draws from the global CPU generator, so each call runs inside ``fork_rng`` with the
    generator seeded by the sample key; the caller's RNG state is restored afterwards.
    """

    def __init__(self, train: bool, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.train = train
        geometry = (
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(int(size / 0.875)), T.CenterCrop(size)]
        )
        self.transform = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, key: int) -> torch.Tensor:
        if not self.train:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key)
            return self.transform(image)
