"""append_domain is exact or says so: column budgets follow rank (a 3-channel stem), appends keep the
appended domain's own logits and leave every earlier domain bit-identical."""

import copy

import pytest
import timm
import torch
from checks import input_for, perturb, train_steps

from adapterkit import AdapterModel
from adapterkit.compress import append_domain, column_budget, factorable_layers


def logits(model, x):
    with torch.no_grad():
        return {d: model(x, domain=d) for d in model.domains}


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return timm.create_model("test_resnet").eval()


def assert_full_rank(model):
    for name, layer in factorable_layers(model).items():
        beta = layer.beta.double()
        assert int(torch.linalg.matrix_rank(beta)) == beta.shape[1], f"{name}: a column adds nothing"


def test_five_trained_factored_domains_append_exactly_at_a_three_channel_stem(backbone):
    model = AdapterModel(copy.deepcopy(backbone)).eval()
    x = input_for(backbone, batch=4, size=32)
    stem = model.layers()["conv1.0"]  # 3 -> 16
    earlier = {}
    for i, d in enumerate("abcde"):
        model.add_domain(d, num_classes=3, factored=True, new_columns=8)
        assert stem.adapters[d].beta_own.shape[1] == 3  # rank, not count: 3 input channels
        train_steps(model, d, x, steps=2)  # real gradients: beta_own has rank <= C_in
        own = logits(model, x)[d]
        report = append_domain(model, d)
        assert report.exact and report.errors["conv1.0"][d] == 0.0  # the stem's 3 columns handed over as is
        out = logits(model, x)
        if all(e[d] == 0.0 for e in report.errors.values()):
            assert torch.equal(out[d], own), d
        else:  # where 2 steps on 4 images left own columns without a direction: re-expressed, round-off
            torch.testing.assert_close(out[d], own, rtol=1e-5, atol=1e-6)
        for old, y in earlier.items():
            assert torch.equal(out[old], y), (d, old)
        earlier[d] = out[d]
        assert stem.beta.shape[1] == 3 * (i + 1)
        assert_full_rank(model)


def test_full_adapters_append_exactly_until_the_basis_is_full(backbone):
    model = AdapterModel(copy.deepcopy(backbone)).eval()
    x = input_for(backbone, size=32)
    earlier = {}
    for i, d in enumerate("abcde"):
        model.add_domain(d, num_classes=3)
        perturb(model, d, seed=i)
        own = logits(model, x)[d]
        report = append_domain(model, d)  # no budget: every direction of the residual is appended
        assert report.exact and max(report.domain_errors.values()) < 1e-5
        out = logits(model, x)
        torch.testing.assert_close(out[d], own, rtol=1e-4, atol=1e-5)  # re-expressed: round-off only
        for old, y in earlier.items():
            assert torch.equal(out[old], y), (d, old)
        earlier[d] = out[d]
        assert_full_rank(model)
    assert model.layers()["conv1.0"].beta.shape[1] == 15  # 3 directions per domain at the stem
    assert model.layers()["conv1.3"].beta.shape[1] == 16  # full after one domain, exact ever after


def test_an_append_that_cannot_be_exact_is_refused_unless_a_budget_is_given(backbone):
    model = AdapterModel(copy.deepcopy(backbone)).eval()
    stem = model.layers()["conv1.0"]
    column = torch.nn.functional.normalize(torch.randn(16, 1), dim=0)
    model.extend_basis({"conv1.0": column.repeat(1, 16)})  # full by count, rank 1
    model.add_domain("a", num_classes=3)
    perturb(model, "a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot be exact.*conv1\.0.*new_columns= or energy="):
        append_domain(model, "a")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert stem.beta.shape[1] == 16 and type(stem.adapters["a"]).__name__ == "FullAdapter"
    report = append_domain(model, "a", new_columns=16)  # the opt-in: projected where it must be
    assert not report.exact and report.errors["conv1.0"]["a"] > 0.1
    assert report.errors["conv1.3"]["a"] < 1e-5


@pytest.mark.parametrize("budget,expected", [(None, 3), (8, 3), (0, 0), (1, 1), (0.5, 2), (1.0, 3)])
def test_column_budget_follows_rank_and_room(backbone, budget, expected):
    model = AdapterModel(copy.deepcopy(backbone))
    assert column_budget(model.layers()["conv1.0"], budget) == expected
    wide = model.layers()["conv1.3"]  # 16 -> 16
    model.extend_basis({"conv1.3": torch.linalg.qr(torch.randn(16, 14))[0]})
    assert column_budget(wide, 8) == 2  # the room left


@pytest.mark.parametrize("budget", [-1, 1.5, 0.0, "4", True])
def test_column_budget_rejects_bad_values(backbone, budget):
    model = AdapterModel(copy.deepcopy(backbone))
    with pytest.raises(ValueError, match="new_columns"):
        column_budget(model.layers()["conv1.0"], budget)
