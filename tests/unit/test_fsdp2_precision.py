"""FSDP2 mixed precision and BatchNorm: refused before any step, with the fix in the message (the
failure itself, a cuDNN dtype error in the first backward, needs a GPU: seen on an H200)."""

import pytest
import timm

from sparse_sup.backends.fsdp2 import check_fsdp2_mixed_precision
from sparse_sup.config import ConfigError


def test_fsdp2_mixed_precision_refuses_batchnorm_and_names_the_fix():
    resnet = timm.create_model("test_resnet", num_classes=10)
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"{precision} mixed precision .* BatchNorm .*ddp-gpu\.yaml"):
            check_fsdp2_mixed_precision(resnet, precision)
    check_fsdp2_mixed_precision(resnet, "no")  # fp32: nothing to refuse


def test_fsdp2_mixed_precision_allows_layernorm_models():
    check_fsdp2_mixed_precision(timm.create_model("test_vit", num_classes=10), "bf16")
