"""The backbones registered by ``adapterkit.backbones`` behave as timm models and load the real weights."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open

import adapterkit.backbones  # noqa: F401  (registers the models)
from adapterkit.inject import create_backbone

CIFAR = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"]
ALL = [*CIFAR, "resnet26_decathlon"]
DATA = Path(os.environ.get("ADAPTERKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _weights(name: str) -> Path:
    path = DATA / "resnet_cifar10" / f"{name.removeprefix('cifar_')}.safetensors"
    if not path.is_file():
        pytest.skip(f"real weights not found at {path} (set ADAPTERKIT_DATA)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registered() -> None:
    assert set(ALL) <= set(timm.list_models())
    # weights come from a local file (no url / hf_hub_id), so the tag is listed but not "pretrained"
    assert timm.list_models("cifar_resnet*", include_tags=True) == [f"{n}.akamaster_cifar10" for n in CIFAR]


@pytest.mark.parametrize("name", ALL)
def test_forward_and_head(name: str) -> None:
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(2, *cfg["input_size"])
    assert model(x).shape == (2, cfg["num_classes"]) == (2, model.num_classes)
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)

    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.global_pool.pool_type == "avg"


@pytest.mark.parametrize("name", ALL)
def test_feature_info(name: str) -> None:
    model = timm.create_model(name)
    info = model.feature_info
    modules = dict(model.named_modules())
    assert [i["module"] for i in info] == ["act1", "layer1", "layer2", "layer3"]
    assert all(i["module"] in modules for i in info)
    assert [i["reduction"] for i in info] == sorted(i["reduction"] for i in info)
    assert info[-1]["num_chs"] == model.num_features

    features = timm.create_model(name, features_only=True).eval()
    size = model.pretrained_cfg["input_size"]
    outs = features(torch.randn(1, *size))
    assert [o.shape[1] for o in outs] == [i["num_chs"] for i in info]
    assert [size[-1] // o.shape[-1] for o in outs] == [i["reduction"] for i in info]


def test_forward_intermediates_follows_timm() -> None:
    model = timm.create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)  # an int: the last n
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        final, _ = model.forward_intermediates(x)
    assert [t.shape[1] for t in every] == [i["num_chs"] for i in model.feature_info]
    assert all(torch.equal(a, b) for a, b in zip(last_two, every[2:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(early, every[:2], strict=True))
    assert torch.equal(final, model.forward_features(x))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet26_decathlon"])
def test_plain_convs_for_adapters(name: str) -> None:
    model = timm.create_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert all(m.bias is None for m in convs)
    assert len(convs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - ("26" in name)


def test_options_and_checkpointing() -> None:
    model = timm.create_model("cifar_resnet20", drop_rate=0.5, num_classes=3, in_chans=1)
    x = torch.randn(2, 1, 24, 24)  # any size works: the global pool adapts
    model.eval()
    ref = model(x)
    model.set_grad_checkpointing()
    assert torch.allclose(model(x), ref)
    model.train()
    model(x.requires_grad_()).sum().backward()
    assert model.conv1.weight.grad is not None
    # odd sizes keep the avg-pool shortcut aligned with the strided conv
    assert timm.create_model("resnet26_decathlon", num_classes=5)(torch.randn(1, 3, 45, 45)).shape == (1, 5)


@pytest.mark.parametrize("name", CIFAR)
def test_real_weights_strict(name: str) -> None:
    path = _weights(name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with safe_open(str(path), "pt") as f:
        # BatchNorm fills the absent num_batches_tracked itself, so torch's strict load accepts the file
        assert set(f.keys()) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
        torch.testing.assert_close(f.get_tensor("linear.weight"), model.linear.weight.detach())


def test_wrong_weights_fail_strict() -> None:
    path = _weights("cifar_resnet20")
    with pytest.raises(RuntimeError, match="Missing key"):
        timm.create_model("cifar_resnet32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(
        ValueError, match=f"{path} does not hold weights for cifar_resnet32 .*pass the weights"
    ):
        create_backbone("cifar_resnet32", pretrained=path)  # one line, as the command line shows it


def test_real_accuracy_smoke() -> None:
    """ResNet-20 on 200 real CIFAR-10 test JPEGs (20 per class): about 81 % expected."""
    model = timm.create_model(
        "cifar_resnet20", pretrained=True, pretrained_cfg_overlay=dict(file=str(_weights("cifar_resnet20")))
    ).eval()
    zip_path = DATA / "cifar10" / "test.zip"
    if not zip_path.is_file():
        pytest.skip(f"CIFAR-10 test JPEGs not found at {zip_path}")
    with zipfile.ZipFile(zip_path) as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        classes = sorted({m.split("/")[1] for m in members})
        picked = [m for c in classes for m in [m for m in members if m.split("/")[1] == c][:20]]
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(m))).convert("RGB")) for m in picked])
    labels = torch.tensor([classes.index(m.split("/")[1]) for m in picked])
    cfg = model.pretrained_cfg
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.6


def test_building_a_backbone_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = create_backbone("test_resnet", seed=3)  # timm draws from the global RNG: a restored fork of it
    assert torch.equal(torch.get_rng_state(), before)
    again = create_backbone("test_resnet", seed=3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
