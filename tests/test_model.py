"""AdapterModel invariants on timm's tiny test models and on each adapter option."""

import json

import pytest
import timm
import torch
from checks import INVARIANTS, Case, CaseSpec, build_case, input_for, perturb

from adapterkit import AdapterConfig, AdapterModel

TEST_MODEL_CASES = [
    CaseSpec(name, refuse="ScaledStdConv2d" if name == "test_nfnet" else None)
    for name in timm.list_models("test_*")
]

CONFIGS = {
    "default": AdapterConfig(),
    "series": AdapterConfig(topology="series"),
    "half": AdapterConfig(placement="half"),
    "late": AdapterConfig(placement=["late"]),
    "early-mid-frozen-norms-dropout": AdapterConfig(
        placement=["early", "mid"], norm_policy="frozen", dropout=0.1
    ),
    "rank2-no-linear": AdapterConfig(rank=2, linear=False),
}
CONFIG_CASES = [
    CaseSpec(name, config, id=f"{name}-{label}")
    for name in ["test_resnet", "test_efficientnet", "test_vit"]
    for label, config in CONFIGS.items()
]


# Module scope: each case is built once; pytest runs all its invariants, then drops it.
@pytest.fixture(scope="module", params=TEST_MODEL_CASES, ids=str)
def test_model_case(request) -> Case:
    return build_case(request.param)


@pytest.fixture(scope="module", params=CONFIG_CASES, ids=str)
def config_case(request) -> Case:
    return build_case(request.param)


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_invariant_on_test_models(test_model_case, invariant, tmp_path):
    INVARIANTS[invariant](test_model_case, tmp_path)


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_invariant_per_config(config_case, invariant, tmp_path):
    INVARIANTS[invariant](config_case, tmp_path)


def test_placement_selects_stages():
    full = AdapterModel.from_backbone("test_resnet")
    late = AdapterModel.from_backbone("test_resnet", AdapterConfig(placement=["late"]))
    half = AdapterModel.from_backbone("test_resnet", AdapterConfig(placement="half"))
    adapted = {t.name for t in late.targets if t.rule != "norm"}
    assert adapted and all(n.startswith("layer4") for n in adapted)
    assert len([t for t in half.targets if t.rule == "parallel"]) < len(
        [t for t in full.targets if t.rule == "parallel"]
    )
    # half: the second 3x3 conv of each basic block only
    assert all(not t.name.endswith("conv1") for t in half.targets if t.rule == "parallel")


def test_overrides_and_strict():
    model = AdapterModel.from_backbone(
        "test_resnet", AdapterConfig(overrides={"layer1.*": "skip", "conv1.0": "series"})
    )
    rules = {t.name: t.rule for t in model.targets}
    assert rules["conv1.0"] == "series"
    assert not any(n.startswith("layer1.") for n in rules)
    with pytest.raises(ValueError, match="does not apply"):
        AdapterModel.from_backbone("test_resnet", AdapterConfig(overrides={"layer1.0.bn1": "parallel"}))
    with pytest.raises(ValueError, match="strict=True"):
        AdapterModel.from_backbone("test_vit", AdapterConfig(strict=True))  # pos_embed, cls_token stay frozen


def test_export_refuses_std_conv_with_reason():
    model = AdapterModel.from_backbone("test_nfnet")
    model.add_domain("a", num_classes=3)
    with pytest.raises(ValueError, match="ScaledStdConv2d: it standardises"):
        model.export_domain("a")


def test_exported_model_is_plain_timm(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("d", num_classes=4, labels=list("wxyz"))
    perturb(model, "d")
    exported = model.export_domain("d")
    timm.models.save_for_hf(exported, tmp_path / "export")
    again = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = input_for(exported)
    with torch.no_grad():
        assert torch.equal(again(x), exported(x))
    assert again.pretrained_cfg["label_names"] == list("wxyz")


def test_an_export_folder_keeps_the_domains_preprocessing_and_is_readable(tmp_path):
    import os
    import stat

    from timm.data import resolve_data_config

    from adapterkit.export import save_export

    model = AdapterModel.from_backbone("test_resnet")
    config = {"input_size": 48, "crop_mode": "squash", "crop_pct": 0.9, "interpolation": "bilinear"}
    model.add_domain("d", num_classes=4, labels=list("wxyz"), data_config=config)
    perturb(model, "d")
    model.eval()
    old = os.umask(0o022)
    try:
        save_export(model, "d", tmp_path / "export")
    finally:
        os.umask(old)
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert files == ["config.json", "model.safetensors"]  # no temporary folder left
    assert all(stat.S_IMODE((tmp_path / "export" / f).stat().st_mode) == 0o644 for f in files)
    again = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    resolved = resolve_data_config(model=again)
    assert (resolved["crop_mode"], resolved["crop_pct"], resolved["interpolation"]) == (
        "squash",
        0.9,
        "bilinear",
    )
    assert resolved["input_size"] == (3, 48, 48) and again.pretrained_cfg["label_names"] == list("wxyz")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    assert "domain 'd' of an adapterkit family on test_resnet" in cfg["description"]
    assert model.fingerprint in cfg["description"] and "tag" not in cfg and "origin_url" not in cfg
    x = input_for(again, size=48)
    with torch.no_grad():
        assert torch.equal(again(x), model(x, domain="d"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; the export is a folder"):
        save_export(model, "d", tmp_path / "file")


def test_accounting():
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("d", num_classes=10)
    cost = model.domain_cost("d")
    assert cost["parameters"] == sum(p.numel() for p in model.trainable_parameters("d"))
    assert 0 < cost["fraction_of_backbone"] < 1
    assert cost["bytes"] >= 4 * cost["parameters"]


def test_remove_and_set_domain():
    model = AdapterModel.from_backbone("test_resnet").eval()
    model.add_domain("a", num_classes=3)
    model.add_domain("b", num_classes=3)
    x = input_for(model.backbone)
    model.set_domain("b")
    with torch.no_grad():
        assert torch.equal(model(x), model(x, domain="b"))
    model.remove_domain("b")
    assert model.domains == ["a"] and model.default_domain is None
    assert all("b" not in layer.adapters for layer in model.layers().values())
