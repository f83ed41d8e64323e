"""Unit tests for sparse_sup.models (real timm models, CPU, no pretrained weights)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from sparse_sup.models import build_model, normalize_name, select_targets

VIT_32 = {"img_size": 32, "patch_size": 4}
VGG19_BN_CIFAR_PARAMS = 20_035_018  # 20,018,880 conv + 11,008 BN + 5,130 fc


@pytest.fixture(scope="module")
def resnet18_cifar() -> nn.Module:
    return build_model("resnet18", 10, cifar_stem=True)


@pytest.fixture(scope="module")
def vit_tiny_32() -> nn.Module:
    return build_model("vit_tiny_patch16_224", 10, kwargs=VIT_32)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


# --- build_model -----------------------------------------------------------


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown model name 'resnet181'.*resnet18"):
        build_model("resnet181", 10)


def test_unknown_name_checked_before_other_args() -> None:
    with pytest.raises(ValueError, match="Unknown model name 'nope_net_xyz'"):
        build_model("nope_net_xyz", 10, cifar_stem=True, kwargs={"pretrained": True})


def test_pretrained_kwarg_rejected() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_model("test_resnet", 10, kwargs={"pretrained": True})


def test_resnet18_cifar_stem(resnet18_cifar: nn.Module) -> None:
    conv1 = resnet18_cifar.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.in_channels == 3 and conv1.out_channels == 64 and conv1.bias is None
    assert isinstance(resnet18_cifar.maxpool, nn.Identity)
    resnet18_cifar.eval()
    with torch.no_grad():
        assert resnet18_cifar(_x()).shape == (2, 10)
        # no stem downsampling: layer4 sees 4x4 on a 32x32 input
        assert resnet18_cifar.forward_features(_x()).shape == (2, 512, 4, 4)


def test_cifar_stem_deep_stem_resnet() -> None:
    model = build_model("resnet10t", 10, cifar_stem=True).eval()
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        assert model(_x()).shape == (2, 10)


def test_cifar_stem_unsupported_model() -> None:
    with pytest.raises(ValueError, match="cifar_stem.*ResNet.*VisionTransformer"):
        build_model("test_vit", 10, cifar_stem=True)


def test_vgg19_bn_cifar() -> None:
    model = build_model("vgg19_bn_cifar", 10).eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == VGG19_BN_CIFAR_PARAMS
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4


def test_vgg19_bn_cifar_via_timm_and_num_classes() -> None:
    model = timm.create_model("vgg19_bn_cifar", num_classes=100, drop_rate=0.1).eval()
    assert "vgg19_bn_cifar" in timm.list_models("*cifar*")
    with torch.no_grad():
        assert model(_x()).shape == (2, 100)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(_x()).shape == (2, 512)


def test_vit_tiny_at_32(vit_tiny_32: nn.Module) -> None:
    vit_tiny_32.eval()
    with torch.no_grad():
        assert vit_tiny_32(_x()).shape == (2, 10)
    assert vit_tiny_32.pos_embed.shape[1] == 1 + (32 // 4) ** 2


def test_drop_rate_forwarded() -> None:
    model = build_model("test_resnet", 10, drop_rate=0.2)
    assert model.drop_rate == 0.2


# --- select_targets ----------------------------------------------------------


def test_default_targets_resnet18(resnet18_cifar: nn.Module) -> None:
    targets = select_targets(resnet18_cifar)
    expected = [n for n, m in resnet18_cifar.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert targets == [f"{n}.weight" for n in expected]
    assert len(targets) == 21  # 17 3x3/stem convs + 3 downsample 1x1 convs + fc
    assert targets[0] == "conv1.weight" and targets[-1] == "fc.weight"
    assert "layer2.0.downsample.0.weight" in targets
    assert not any("bn" in t or t.endswith(".bias") for t in targets)


def test_default_targets_vit(vit_tiny_32: nn.Module) -> None:
    targets = select_targets(vit_tiny_32)
    assert len(targets) == 2 + 4 * 12  # patch_embed + head + (qkv, proj, fc1, fc2) x 12 blocks
    for name in (
        "patch_embed.proj.weight",
        "head.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.11.mlp.fc1.weight",
        "blocks.11.mlp.fc2.weight",
    ):
        assert name in targets
    for t in targets:
        assert t.endswith(".weight") and "norm" not in t
    assert "pos_embed" not in targets and "cls_token" not in targets
    assert targets == [n for n, _ in vit_tiny_32.named_parameters() if n in set(targets)]


def test_include_exclude_patterns(vit_tiny_32: nn.Module) -> None:
    only_attn = select_targets(vit_tiny_32, include=["blocks.*.attn.*.weight"])
    assert len(only_attn) == 24 and all(".attn." in t for t in only_attn)

    no_head = select_targets(vit_tiny_32, exclude=["head.*", "patch_embed.*"])
    assert len(no_head) == 48 and "head.weight" not in no_head

    # include may select non-default (1-d / embedding) params; exclude always wins
    picked = select_targets(vit_tiny_32, include=["pos_embed", "*.bias"], exclude=["head.*"])
    assert picked[0] == "pos_embed" and "head.bias" not in picked
    assert "blocks.0.attn.qkv.bias" in picked and "blocks.0.attn.qkv.weight" not in picked


@pytest.mark.parametrize("kw", [{"include": ["*.conv_nope.*"]}, {"exclude": ["fc", "nothing_like_this*"]}])
def test_unmatched_pattern_raises(resnet18_cifar: nn.Module, kw: dict) -> None:
    with pytest.raises(ValueError, match=r"pattern '.*' matches no parameter.*example parameter names"):
        select_targets(resnet18_cifar, **kw)


def test_bare_string_pattern_rejected(resnet18_cifar: nn.Module) -> None:
    with pytest.raises(TypeError):
        select_targets(resnet18_cifar, include="*.weight")  # type: ignore[arg-type]


def test_targets_under_wrapper_match_by_normalized_name() -> None:
    inner = build_model("test_resnet", 10)
    wrapped = nn.Sequential()
    wrapped.add_module("module", inner)  # same naming as DDP: "module.<name>"
    plain = select_targets(inner)
    under = select_targets(wrapped, exclude=["fc.*"])
    assert all(t.startswith("module.") for t in under)
    assert [normalize_name(t) for t in under] == [t for t in plain if t != "fc.weight"]


# --- normalize_name ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("module.layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("_orig_mod.module.head.weight", "head.weight"),
        ("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
        ("blocks.3._checkpoint_wrapped_module.mlp.fc1.weight", "blocks.3.mlp.fc1.weight"),
        ("my_module.weight", "my_module.weight"),
        ("modules.0.weight", "modules.0.weight"),
    ],
)
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


# --- nn.MultiheadAttention keeps q/k/v outside any Linear ---------------------------------------


def test_default_targets_torchvision_vit_include_mha_in_proj() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    targets = select_targets(model)
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}"
        assert f"{block}.self_attention.in_proj_weight" in targets
        assert f"{block}.self_attention.out_proj.weight" in targets
        assert f"{block}.self_attention.in_proj_bias" not in targets
    assert "conv_proj.weight" in targets and "heads.head.weight" in targets
    assert "class_token" not in targets and "encoder.pos_embedding" not in targets
    # every matrix of the model is a target: nothing of ndim >= 2 outside the embeddings stays dense
    dense = [n for n, p in model.named_parameters() if p.ndim >= 2 and n not in targets]
    assert dense == ["class_token", "encoder.pos_embedding"], dense


def test_default_targets_mha_with_separate_qkv_weights() -> None:
    layer = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)  # different dims: q/k/v_proj_weight
    assert layer.in_proj_weight is None
    targets = select_targets(nn.Sequential(layer))
    assert targets == ["0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight", "0.out_proj.weight"]
    encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    assert select_targets(encoder) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_kwargs_the_model_does_not_take_are_named() -> None:
    with pytest.raises(ValueError, match=r"model.kwargs=\{'img_sise': 32\} is not accepted"):
        build_model("test_resnet", 10, kwargs={"img_sise": 32})
