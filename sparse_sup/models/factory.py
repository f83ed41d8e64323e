"""Build any timm model by name, optionally with a CIFAR stem and with weights from a local file
(``model.checkpoint``) or from timm's pretrained weights already in the local HF / torch hub cache
(``model.pretrained``; never downloads)."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import timm
from torch import nn

from ..config.errors import ConfigError
from . import vgg_cifar  # noqa: F401  (registers 'vgg19_bn_cifar' with timm)
from .cifar_stem import apply_cifar_stem

__all__ = ["build_model"]

_LOG = logging.getLogger(__name__)

_RESERVED_KWARGS = (
    "pretrained",
    "num_classes",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
)


def _check_known(name: str) -> None:
    """Raise ``ValueError`` (with close matches) if timm does not know ``name``."""
    if isinstance(name, str) and timm.is_model(name):
        return
    close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
    raise ConfigError(f"Unknown model name {name!r} (model.name).{hint}")


def cached_pretrained_file(name: str) -> str:
    """Path of timm's pretrained weights for ``name`` (``arch`` or ``arch.tag``) in the local
    Hugging Face hub cache (or, for URL-hosted weights, torch hub's); FileNotFoundError otherwise."""
    import huggingface_hub
    import torch.hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"model.pretrained=true: timm has no pretrained weights for {name!r}")
    tried = []
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
            tried.append(f"hf://{repo}/{filename}")
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url.split("?")[0]))
        if os.path.isfile(path):
            return path
        tried.append(path)
    raise FileNotFoundError(
        f"model.pretrained=true: the weights of {name!r} are not in the local cache (looked for "
        f"{', '.join(tried)}; HF cache {huggingface_hub.constants.HF_HUB_CACHE}). Nothing is downloaded: "
        f"fetch them on a connected machine (timm.create_model({name!r}, pretrained=True)) and copy "
        "the cache (HF_HOME) here, or pass a local file as model.checkpoint"
    )


def load_checkpoint_file(model: nn.Module, path: str) -> list[str]:
    """Load a local weights file (safetensors, or a torch checkpoint with or without a ``state_dict``
    / ``model`` entry) into ``model``. The classifier may differ in shape (another number of classes):
    it then keeps its fresh init. Any other missing, unexpected or mis-shaped key is an error.
    Returns the names left at their init."""
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.checkpoint={path!r} does not exist")
    state = load_state_dict(path, use_ema=False)
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    skipped = [k for k in reshaped if k.startswith(heads)]
    for k in skipped:
        del state[k]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped if k not in skipped]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"model.checkpoint={path!r} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes {wrong[:5]} (only the classifier may differ)"
        )
    model.load_state_dict(state, strict=False)
    if skipped:
        _LOG.info("model.checkpoint: classifier %s re-initialised (shape differs)", skipped)
    return skipped


def build_model(
    name: str,
    num_classes: int,
    cifar_stem: bool = False,
    drop_rate: float = 0.0,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> nn.Module:
    """Create ``timm.create_model(name, num_classes=..., **kwargs)``; ``pretrained`` loads timm's
    weights from the local cache only (a classifier of another size is re-initialised, a CIFAR stem
    replaces the pretrained stem), ``checkpoint`` a local file after the stem is applied.

    Args:
        name: any registered timm name (incl. ``vgg19_bn_cifar``), optionally with a ``.tag``.
        num_classes: classifier outputs (0 = timm's pooled-features / no head).
        cifar_stem: swap a timm ResNet stem for 3x3/s1 conv and drop the max-pool.
        drop_rate: classifier dropout, forwarded as timm's ``drop_rate`` when non-zero.
        kwargs: extra model kwargs, e.g. ``{"img_size": 32, "patch_size": 4}`` for ViTs.

    Raises:
        ValueError: unknown name (checked first), conflicting/reserved kwargs, or
            ``cifar_stem`` on a non-ResNet.
    """
    _check_known(name)
    if not isinstance(cifar_stem, bool):
        raise TypeError(f"cifar_stem must be a bool, got {cifar_stem!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    extra = dict(kwargs or {})
    bad = [k for k in _RESERVED_KWARGS if k in extra]
    if bad:
        raise ConfigError(
            f"model.kwargs may not set {bad}: use model.pretrained / model.checkpoint for weights; "
            "num_classes is model.num_classes"
        )
    if pretrained and checkpoint:
        raise ConfigError("set model.pretrained or model.checkpoint, not both")
    if drop_rate:
        if "drop_rate" in extra and extra["drop_rate"] != drop_rate:
            raise ConfigError(
                f"model.drop_rate={drop_rate} conflicts with model.kwargs['drop_rate']={extra['drop_rate']}"
            )
        extra["drop_rate"] = drop_rate

    try:
        if pretrained:
            path = cached_pretrained_file(name)
            _LOG.info("pretrained weights of %s from the local cache: %s", name, path)
            overlay = {"file": path, "source": "file"}
            extra = {**extra, "pretrained_cfg_overlay": overlay}
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **extra)
        extra.pop("pretrained_cfg_overlay", None)
    except TypeError as e:  # a keyword the model's constructor does not take
        if not extra or "argument" not in str(e):
            raise
        raise ConfigError(
            f"model.kwargs={extra} is not accepted by timm model {name!r}: {e}; "
            "remove or rename the key (see the model's constructor in timm)"
        ) from None
    if cifar_stem:
        apply_cifar_stem(model, name)
    if checkpoint:
        load_checkpoint_file(model, os.path.expanduser(checkpoint))
    n_params = sum(p.numel() for p in model.parameters())
    _LOG.info(
        "built %s (num_classes=%d, cifar_stem=%s, kwargs=%s): %.2fM params",
        name,
        num_classes,
        cifar_stem,
        extra,
        n_params / 1e6,
    )
    return model
