"""train_domain(factored=True): a new domain trained directly against the frozen shared basis plus its own
columns, seeded from the config, old domains bit-identical; then shared exactly with append_domain."""

import pytest
import torch
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401

from adapterkit.compress import append_domain, factorable_layers
from adapterkit.layers import LowRankAdapter
from adapterkit.train import train_domain


def probe_logits(model, names):
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {d: model(x, domain=d) for d in names}


def grown_model():
    model = make_model()
    train_domain(model, "a", Toy(16, 3), config=cfg(steps=2), data_config=SIZE, factored=True, new_columns=4)
    append_domain(model, "a")
    return model


def test_a_factored_domain_trains_its_gamma_and_own_columns_only():
    model = grown_model()
    basis = {n: b.clone() for n, b in model.basis().items()}
    before = probe_logits(model, ["a"])
    torch.manual_seed(123)  # the global RNG must not matter: the new domain is seeded from the config
    train_domain(
        model, "b", Toy(16, 4, seed=1), config=cfg(steps=3), data_config=SIZE, factored=True, new_columns=4
    )
    after = probe_logits(model, ["a", "b"])
    assert torch.equal(after["a"], before["a"])
    assert all(torch.equal(b, basis[n]) for n, b in model.basis().items())  # the shared columns are frozen
    for name, layer in factorable_layers(model).items():
        adapter = layer.adapters["b"]
        assert isinstance(adapter, LowRankAdapter) and adapter.shared_columns == basis[name].shape[1]
        assert adapter.beta_own.shape[1] <= 4
    stem = model.layers()["conv1.0"].adapters["b"]
    assert stem.beta_own.shape[1] == 3 and stem.beta_own.abs().sum() > 0  # trained, at most C_in columns
    assert stem.gamma[:, : stem.shared_columns].abs().sum() > 0  # its gamma on the old columns trained too
    report = append_domain(model, "b")
    assert report.exact
    assert torch.equal(probe_logits(model, ["a"])["a"], before["a"])

    again = grown_model()
    torch.manual_seed(7)
    train_domain(
        again, "b", Toy(16, 4, seed=1), config=cfg(steps=3), data_config=SIZE, factored=True, new_columns=4
    )
    append_domain(again, "b")
    assert torch.equal(probe_logits(again, ["b"])["b"], probe_logits(model, ["b"])["b"])


def test_factored_applies_to_a_new_domain_only():
    model = grown_model()
    with pytest.raises(ValueError, match="overwrite=True"):
        train_domain(model, "a", Toy(16, 3), config=cfg(steps=1), resume=True, factored=True)
