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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    top, left, flip = keys % n, (keys // n) % n, (keys // (n * n)) % 2 == 1
    rows = top[:, None] + torch.arange(h)  # [B,H] rows of the padded image
    cols = torch.arange(w)
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
