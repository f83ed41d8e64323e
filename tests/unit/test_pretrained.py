"""Weights for fine-tuning: a local file (``model.checkpoint``) and timm's pretrained weights from
the local Hugging Face cache only (``model.pretrained``), with real timm models whose weights the
tests save themselves (no download: the cache is built here, in the hub's own layout)."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from sparse_sup.config import ConfigError
from sparse_sup.models import build_model


def _saved(tmp_path, name="test_resnet", num_classes=10, seed=1):
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict(), path


def test_checkpoint_file_loads_every_tensor_and_a_new_head_keeps_its_init(tmp_path):
    saved, path = _saved(tmp_path)
    torch.manual_seed(7)
    model = build_model("test_resnet", 10, checkpoint=str(path))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    torch.manual_seed(7)
    fresh = build_model("test_resnet", 5).state_dict()
    torch.manual_seed(7)
    other = build_model("test_resnet", 5, checkpoint=str(path)).state_dict()  # another number of classes
    assert other["fc.weight"].shape == (5, saved["fc.weight"].shape[1])
    assert torch.equal(other["fc.weight"], fresh["fc.weight"])  # the head keeps its init
    assert all(torch.equal(v, saved[k]) for k, v in other.items() if not k.startswith("fc."))
    # a torch checkpoint with a "state_dict" entry (timm's train.py format) loads the same
    pth = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 3, "state_dict": saved}, pth)
    loaded = build_model("test_resnet", 10, checkpoint=str(pth)).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.items())


def test_checkpoint_of_another_model_or_missing_file_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ConfigError, match="does not fit .*only the classifier may differ"):
        build_model("test_vit", 10, checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("test_resnet", 10, checkpoint=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="not both"):
        build_model("test_resnet", 10, pretrained=True, checkpoint=str(path))


def test_pretrained_only_from_the_local_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=r"not in the local cache .*hf://timm/test_resnet.r160_in1k"):
        build_model("test_resnet", 10, pretrained=True)
    # the hub cache layout: refs/main -> snapshots/<revision>/model.safetensors
    saved, path = _saved(tmp_path, num_classes=1000)
    repo = cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(path.read_bytes())
    model = build_model("test_resnet", 10, pretrained=True)  # 10 classes: timm drops the 1000-class head
    state = model.state_dict()
    assert state["fc.weight"].shape[0] == 10
    assert all(torch.equal(v, saved[k]) for k, v in state.items() if not k.startswith("fc."))
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model("vgg19_bn_cifar", 10, pretrained=True)
