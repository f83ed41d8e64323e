"""Parameter-name normalisation, so masks bind by name under any wrapper."""

from __future__ import annotations

WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def normalize_name(name: str) -> str:
    """Drop wrapper components (DDP/DeepSpeed ``module``, torch.compile ``_orig_mod``, FSDP and
    activation-checkpoint wrappers) wherever they appear as whole dotted components."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)
