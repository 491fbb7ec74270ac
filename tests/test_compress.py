"""The shared basis on a live model: joint compression, incremental appends, re-factorisation, storage."""

import copy
import math

import pytest
import timm
import torch
from checks import input_for, perturb

from adapterkit import AdapterModel
from adapterkit.compress import append_domain, compress, factorable_layers, parameter_report, refactorize
from adapterkit.family import save_family
from adapterkit.load import load_family


def make_model(names=("a", "b", "c"), backbone="test_resnet"):
    torch.manual_seed(0)
    bb = timm.create_model(backbone).eval()
    model = AdapterModel(copy.deepcopy(bb)).eval()
    for i, n in enumerate(names):
        model.add_domain(n, num_classes=3 + i)
        perturb(model, n, seed=i)
    return model, bb


def logits(model, x):
    with torch.no_grad():
        return {d: model(x, domain=d) for d in model.domains}


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_efficientnet"])
def test_energy_one_loses_nothing(backbone):
    model, bb = make_model(backbone=backbone)
    x = input_for(bb)
    before = logits(model, x)
    report = compress(model, energy=1.0)
    assert max(report.domain_errors.values()) < 1e-5
    for d, y in logits(model, x).items():
        torch.testing.assert_close(y, before[d], rtol=1e-4, atol=1e-5)


def test_error_falls_as_rank_rises():
    model, _ = make_model()
    errors = [sum(refactorize(model, basis_rank=r).domain_errors.values()) for r in (0.125, 0.25, 0.5, 1.0)]
    assert all(e1 >= e2 - 1e-7 for e1, e2 in zip(errors, errors[1:], strict=False))
    assert errors[0] > errors[-1]


def test_refactorize_reports_without_applying():
    model, bb = make_model()
    x = input_for(bb)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, x)

    def agreement(m, d):  # a stand-in for accuracy: agreement with the uncompressed predictions
        with torch.no_grad():
            return (m(x, domain=d).argmax(1) == before[d].argmax(1)).float().mean().item()

    report = refactorize(model, basis_rank=0.5, evaluate=agreement)
    assert not report.applied
    assert set(report.accuracy_change) == set(report.accuracy_before) == {"a", "b", "c"}
    assert all(v == 1.0 for v in report.accuracy_before.values())
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_compress_half_rank_shrinks_the_family():
    model, _ = make_model(names=[f"d{i}" for i in range(6)])
    before = parameter_report(model)
    report = compress(model, basis_rank=0.5)
    after = parameter_report(model)
    assert after["total"] < before["total"]
    conv = model.layers()["layer2.0.conv2"]  # a dense 3x3 conv
    assert conv.beta.shape[1] == math.ceil(conv.base_layer.out_channels / 2) or conv.beta.shape[1] == (
        conv.base_layer.out_channels // 2
    )
    assert report.parameters["relative"] == pytest.approx(after["relative"])


def test_old_domains_bit_identical_after_three_incremental_additions(tmp_path):
    model, bb = make_model(names=["a"])
    x = input_for(bb)
    append_domain(model, "a", new_columns=4)  # project the full adapters of a onto an empty basis
    ref = logits(model, x)["a"]
    save_family(model, tmp_path / "fam")
    file_a = (tmp_path / "fam" / "domains" / "a.safetensors").read_bytes()
    widths = [sum(m.beta.shape[1] for m in factorable_layers(model).values())]
    # three more domains through both paths
    model.add_domain("b", num_classes=4, factored=True, new_columns=2)
    perturb(model, "b", seed=5)
    with torch.no_grad():
        before_b = model(x, domain="b")
    report_b = append_domain(model, "b")  # exact where there is room: b's own columns become shared
    assert report_b.errors and all(e["b"] == 0.0 for e in report_b.errors.values())  # room: the exact path
    model.add_domain("c", num_classes=5)
    perturb(model, "c", seed=6)
    append_domain(model, "c", energy=0.9)  # full adapter projected, residual appended
    model.add_domain("d", num_classes=2, factored=True)
    perturb(model, "d", seed=7)
    append_domain(model, "d")
    widths.append(sum(m.beta.shape[1] for m in factorable_layers(model).values()))
    assert widths[1] > widths[0]
    out = logits(model, x)
    assert torch.equal(out["a"], ref)
    assert torch.equal(out["b"], before_b)  # the exact path does not change the domain itself
    save_family(model, tmp_path / "fam")
    assert (tmp_path / "fam" / "domains" / "a.safetensors").read_bytes() == file_a
    loaded = load_family(AdapterModel, str(tmp_path / "fam"), backbone=copy.deepcopy(bb)).eval()
    assert loaded.domains == model.domains
    for d, y in logits(loaded, x).items():
        assert torch.equal(y, out[d]), d
    # hot-loading the grown family's new domain into a model that has only the old basis
    old = load_family(AdapterModel, str(tmp_path / "fam"), domains=["a"], backbone=copy.deepcopy(bb)).eval()
    old.load_domain(tmp_path / "fam", "d")
    assert torch.equal(logits(old, x)["a"], ref)


def test_basis_never_exceeds_c_out():
    model, _ = make_model(names=[f"d{i}" for i in range(5)])
    for d in model.domains:
        append_domain(model, d, energy=1.0)
    layers = factorable_layers(model)
    assert layers and all(layer.beta.shape[1] > 0 for layer in layers.values())  # the basis did grow
    for layer in layers.values():
        assert layer.beta.shape[1] <= layer.beta.shape[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"basis_rank": 0}, "rank"),
        ({"basis_rank": -1}, "rank"),
        ({"basis_rank": 10_000}, "rank"),
        ({"energy": float("nan")}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({}, "rank|energy"),
    ],
)
def test_bad_ranks(kwargs, match):
    model, _ = make_model()
    with pytest.raises(ValueError, match=match):
        refactorize(model, **kwargs)
