"""Which parameters get sparsified, and wrapper-independent parameter names."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..config.errors import ConfigError

# Single source of truth (timm-free, shared with the backends): re-exported here.
from ..core.names import WRAPPER_COMPONENTS, normalize_name

__all__ = ["WRAPPER_COMPONENTS", "normalize_name", "select_targets"]

_LOG = logging.getLogger(__name__)


def _check_patterns(patterns: Sequence[str] | None, arg: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise TypeError(f"{arg} must be a list of glob patterns, not a string: {patterns!r}")
    return [str(p) for p in patterns]


def _matches(pattern: str, raw: str, norm: str) -> bool:
    return fnmatchcase(norm, pattern) or fnmatchcase(raw, pattern)


# nn.MultiheadAttention keeps its q/k/v projection as parameters of its own, not in a Linear
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _default_target_ids(model: nn.Module) -> set[int]:
    """ids of the ``weight`` parameters of every Conv (1/2/3-d, transposed) and Linear module, and
    of the q/k/v projection weights of every ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear)."""
    ids: set[int] = set()
    for module in model.modules():
        names = ("weight",) if isinstance(module, (_ConvNd, nn.Linear)) else ()
        if isinstance(module, nn.MultiheadAttention):
            names = _MHA_WEIGHTS
        for name in names:
            weight = getattr(module, name, None)
            if isinstance(weight, nn.Parameter) and weight.ndim >= 2:
                ids.add(id(weight))
    return ids


def _unmatched_error(pattern: str, arg: str, names: Iterable[str]) -> ConfigError:
    names = list(names)
    examples = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3) or names[:5]
    return ConfigError(
        f"sparse.{arg} pattern {pattern!r} matches no parameter of the model; "
        f"example parameter names: {examples} ({len(names)} in total)"
    )


def select_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Names (as in ``model.named_parameters()``, same order) of the parameters to sparsify.

    Default: the ``weight`` of every Conv/Linear module (stem and classifier included) and the
    q/k/v projection weights of ``nn.MultiheadAttention`` (``in_proj_weight``);
    biases, norms, embeddings, pos_embed/cls_token stay dense. ``include``: fnmatch
    globs replacing the default (any floating-point parameter matching one is a
    target); ``exclude``: globs always removed. Patterns are tried against both the
    raw and the :func:`normalize_name`-d name, so they work under DDP/compile/FSDP
    wrappers. An empty or ``None`` ``include`` means the default rule.

    Raises:
        ValueError: a pattern matches no parameter at all.
        TypeError: ``include``/``exclude`` given as a bare string.
    """
    inc = _check_patterns(include, "include")
    exc = _check_patterns(exclude, "exclude")
    named = list(model.named_parameters())
    norms = [normalize_name(n) for n, _ in named]
    for arg, patterns in (("include", inc), ("exclude", exc)):
        for pat in patterns:
            if not any(_matches(pat, raw, norm) for (raw, _), norm in zip(named, norms, strict=True)):
                raise _unmatched_error(pat, arg, norms)

    default_ids = _default_target_ids(model) if not inc else set()
    targets: list[str] = []
    for (raw, param), norm in zip(named, norms, strict=True):
        if inc:
            chosen = param.is_floating_point() and any(_matches(p, raw, norm) for p in inc)
        else:
            chosen = id(param) in default_ids
        if chosen and not any(_matches(p, raw, norm) for p in exc):
            targets.append(raw)

    chosen_names = set(targets)
    n_el = sum(p.numel() for n, p in named if n in chosen_names)
    total = sum(p.numel() for _, p in named)
    if not targets:
        _LOG.warning("select_targets: no parameter selected (include=%s, exclude=%s)", inc, exc)
    _LOG.info(
        "select_targets: %d/%d tensors, %d/%d elements (%.1f%%)",
        len(targets),
        len(named),
        n_el,
        total,
        100.0 * n_el / max(total, 1),
    )
    return targets
