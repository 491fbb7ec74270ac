"""Bad input gets a clear error naming the problem and the fix, and leaves the model unchanged."""

import copy
import json

import pytest
import timm
import torch
from checks import input_for, perturb

from adapterkit import AdapterModel
from adapterkit.family import save_family
from adapterkit.load import load_family


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, list(model.domains)


def assert_unchanged(model, before):
    state, domains = before
    assert model.domains == domains
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture
def family(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet").eval()
    model = AdapterModel(copy.deepcopy(backbone)).eval()
    model.add_domain("a", num_classes=3)
    model.add_domain("b", num_classes=4)
    perturb(model, "a")
    perturb(model, "b", seed=1)
    save_family(model, tmp_path / "fam")
    return model, backbone, tmp_path / "fam"


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a.b", "-lead", "with space", "x" * 65, 3, None])
def test_unsafe_domain_name(family, name):
    model, _, _ = family
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a safe file name"):
        model.add_domain(name, num_classes=2)
    assert_unchanged(model, before)


def test_duplicate_domain(family):
    model, _, _ = family
    before = snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        model.add_domain("a", num_classes=2)
    with pytest.raises(ValueError, match="only by case"):
        model.add_domain("A", num_classes=2)
    assert_unchanged(model, before)


def test_unknown_domain(family):
    model, backbone, _ = family
    x = input_for(backbone)
    with pytest.raises(KeyError, match="unknown domain 'nope'.*add_domain"):
        model(x, domain="nope")
    with pytest.raises(KeyError, match="unknown domain"):
        model(x, domain=["a", "nope"])
    with pytest.raises(KeyError, match="unknown domain"):
        model.remove_domain("nope")
    with pytest.raises(KeyError, match="unknown domain"):
        model.export_domain("nope")


def test_wrong_input_channels(family):
    model, backbone, _ = family
    x = input_for(backbone)[:, :1]
    with pytest.raises(ValueError, match="expects 3 input channels, got 1.*convert"):
        model(x, domain="a")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x[0], r"one image \(3, \d+, \d+\), not a batch: pass x.unsqueeze\(0\)"),
        (lambda x: x.permute(0, 2, 3, 1), r"\(N, H, W, C\) batch .*x.permute\(0, 3, 1, 2\)"),
        (
            lambda x: (x * 255).to(torch.uint8),
            r"torch.uint8 images: the model takes float images.*Preprocess",
        ),
        (
            lambda x: x.double(),
            r"images are torch.float64 and the model is torch.float32: pass x.to\(torch.float32\)",
        ),
    ],
)
def test_batches_in_another_form_say_how_to_convert(family, change, message):
    model, backbone, _ = family
    x = input_for(backbone).abs().clamp(0, 1)
    for domain in ("a", ["a", "b"]):
        with pytest.raises(ValueError, match=message):
            model(change(x), domain=domain)  # checked before the domains are


def test_domain_list_length(family):
    model, backbone, _ = family
    with pytest.raises(ValueError, match="got 3 domains for a batch of 2"):
        model(input_for(backbone), domain=["a", "b", "a"])


def test_bad_num_classes_and_labels(family):
    model, _, _ = family
    before = snapshot(model)
    cases = [
        ({"num_classes": 0}, "num_classes=0 must be a positive int"),
        ({"num_classes": 2, "labels": ["x"]}, "1 labels given for num_classes=2"),
        ({}, "needs num_classes"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model.add_domain("c", **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_domain_file(family, damage):
    model, backbone, path = family
    f = path / "domains" / "b.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {
            "truncate": data[: len(data) // 2],
            "garbage": b"\x00" * 64,
            "flip": data[:-1] + bytes([data[-1] ^ 1]),
        }[damage]
    )
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_family(AdapterModel, str(path), backbone=copy.deepcopy(backbone))
    # hot-loading the damaged domain into a live model leaves it unchanged
    live = load_family(AdapterModel, str(path), domains=["a"], backbone=copy.deepcopy(backbone))
    before = snapshot(live)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        live.load_domain(path, "b")
    assert_unchanged(live, before)


def test_corrupt_family_json(family):
    _, backbone, path = family
    (path / "adapterkit.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_family(AdapterModel, str(path), backbone=backbone)
    (path / "adapterkit.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_family(AdapterModel, str(path), backbone=backbone)


def test_wrong_backbone_weights(family):
    model, backbone, path = family
    other = copy.deepcopy(backbone)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="weights differ.*force=True"):
        load_family(AdapterModel, str(path), backbone=other)
    forced = load_family(AdapterModel, str(path), backbone=copy.deepcopy(other), force=True)
    assert forced.domains == ["a", "b"]
    live = AdapterModel(copy.deepcopy(other))
    before = snapshot(live)
    with pytest.raises(ValueError, match="weights differ"):
        live.load_domain(path, "a")
    assert_unchanged(live, before)


def test_wrong_backbone_architecture(family):
    _, _, path = family
    for force in (False, True):  # no force can help: the layout is named, and force=True is not suggested
        with pytest.raises(ValueError, match="adapter layout") as e:
            load_family(AdapterModel, str(path), backbone=timm.create_model("test_efficientnet"), force=force)
        assert "force" not in str(e.value)
    live = AdapterModel(timm.create_model("test_efficientnet"))
    with pytest.raises(ValueError, match="adapter layout") as e:
        live.load_domain(path, "a")
    assert "force" not in str(e.value)


def test_unknown_domain_in_family(family):
    _, backbone, path = family
    with pytest.raises(KeyError, match="'zzz'.*it has: a, b"):
        load_family(AdapterModel, str(path), domains=["zzz"], backbone=backbone)


def test_tampered_domain_name_in_version_1_table(family):
    _, backbone, path = family
    config = json.loads((path / "adapterkit.json").read_text())
    config["format_version"] = 1
    config["domains"] = {"../../etc": json.loads((path / "domains" / "a.json").read_text())}
    (path / "adapterkit.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a safe file name"):
        load_family(AdapterModel, str(path), backbone=backbone)


def test_tampered_domain_entry(family):
    _, backbone, path = family
    entry = json.loads((path / "domains" / "a.json").read_text())
    (path / "domains" / "a.json").write_text(json.dumps(entry | {"name": "../../etc"}))
    with pytest.raises(ValueError, match="describes domain '../../etc'"):
        load_family(AdapterModel, str(path), backbone=backbone)


def test_single_domain_load_reads_one_file(family):
    model, backbone, path = family
    (path / "domains" / "b.safetensors").unlink()  # a must load without b's file
    only_a = load_family(AdapterModel, str(path), domains=["a"], backbone=copy.deepcopy(backbone)).eval()
    x = input_for(backbone)
    with torch.no_grad():
        assert torch.equal(only_a(x, domain="a"), model(x, domain="a"))


def test_adding_a_domain_keeps_old_files_byte_identical(family):
    model, _, path = family
    old = {p.name: p.read_bytes() for p in (path / "domains").iterdir()}
    model.add_domain("c", num_classes=2)
    save_family(model, path)
    new = {p.name: p.read_bytes() for p in (path / "domains").iterdir()}
    assert set(new) == set(old) | {"c.safetensors", "c.json"}
    assert all(new[k] == v for k, v in old.items())


def test_a_backbone_name_of_another_architecture_is_refused_before_anything_is_built(family):
    _, _, path = family
    config = json.loads((path / "adapterkit.json").read_text())
    config["backbone"]["name"] = "test_resnet"
    (path / "adapterkit.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="trained on backbone 'test_resnet', and backbone='cifar_resnet20' is another"
    ):
        load_family(AdapterModel, str(path), backbone="cifar_resnet20")


def test_from_pretrained_arguments_that_cannot_be_meant(family):
    _, backbone, path = family
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['domian'\]"):
        AdapterModel.from_pretrained(path, domian=["a"], backbone=backbone)
    with pytest.raises(TypeError, match=r"domains='a': pass a list of names, domains=\['a'\]"):
        AdapterModel.from_pretrained(path, domains="a", backbone=backbone)
    with pytest.raises(NotADirectoryError, match="adapterkit.json is a file; a family is a folder: pass"):
        AdapterModel.from_pretrained(path / "adapterkit.json", backbone=backbone)
    assert AdapterModel.from_pretrained(path, domains=["a"], backbone=backbone, revision=None).domains == [
        "a"
    ]


def test_a_domain_with_one_of_its_two_files_is_named(family, caplog):
    _, backbone, path = family
    (path / "domains" / "b.safetensors").unlink()
    with pytest.raises(KeyError, match=r"b has only domains/b.json \(a domain needs both"):
        load_family(AdapterModel, str(path), domains=["b"], backbone=backbone)
    assert load_family(AdapterModel, str(path), backbone=backbone).domains == ["a"]
    assert "domain(s) b have one of their two files and are not loaded (b: domains/b.json)" in caplog.text
