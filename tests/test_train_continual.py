"""The sequential runner: the accuracy matrix has constant columns (BWT exactly 0); baselines run."""

from __future__ import annotations

import pytest
import torch
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)

from adapterkit.continual import (
    DomainSpec,
    comparison_table,
    finetune_baseline,
    linear_probe_baseline,
    train_sequence,
)


def domains():
    return [
        DomainSpec("first", Toy(24, 3), Toy(10, 3, seed=1), config=cfg(epochs=2), data_config=SIZE),
        DomainSpec(
            "second",
            Toy(24, 5, seed=2),
            Toy(10, 5, seed=3),
            config=cfg(epochs=2, flip=False),
            data_config=SIZE,
        ),
        DomainSpec("third", Toy(16, 2, seed=4), Toy(9, 2, seed=5), config=cfg(steps=3), data_config=SIZE),
    ]


def test_sequence_never_forgets_and_reports_costs():
    model = make_model()
    result = train_sequence(model, domains())
    r = result.report.matrix
    for j in range(3):
        assert all(r[i, j] == r[j, j] for i in range(j, 3)), f"column {j} changed: {r[:, j]}"
    assert result.report.bwt == 0.0 and result.report.forgetting == 0.0
    assert model.domains == ["first", "second", "third"]
    assert model.domain_info("second").data_config["input_size"] == [3, 32, 32]
    assert model.domain_info("second").metrics["accuracy"] == r[1, 1]
    costs = result.costs["second"]
    assert costs["parameters"] > 0 and 0 < costs["fraction_of_backbone"] < 1
    assert result.total_parameters() == pytest.approx(
        1 + sum(c["fraction_of_backbone"] for c in result.costs.values())
    )
    assert "second" in result.cost_table()


def test_baselines_and_comparison():
    finetune = finetune_baseline("test_resnet", domains(), overrides={"lr": 0.01})
    probe = linear_probe_baseline("test_resnet", domains())
    assert finetune.total_parameters() == pytest.approx(3.0, rel=0.05)  # one backbone per domain
    assert probe.total_parameters() < 1.01  # heads only
    score, per_domain = finetune.decathlon(finetune.errors(), floor=0.05)
    assert all(s == pytest.approx(250.0) for name, s in per_domain.items() if finetune.errors()[name] >= 0.05)
    table = comparison_table([probe, finetune], finetune, floor=0.05)
    assert "linear probe" in table and "fine-tuning" in table and "Decathlon" in table
    with torch.no_grad():
        assert torch.isfinite(torch.tensor(score))


def test_bwt_is_measured_not_assumed(monkeypatch):
    """train_sequence re-evaluates earlier domains: damage one after the next is trained and BWT shows it."""
    from adapterkit import continual

    real, trained, test_first = continual.train_domain, {}, Toy(10, 3, seed=1)
    share = [sum(t == k for t in test_first.targets) / 10 for k in range(3)]

    def train_then_damage_first(model, name, *args, **kwargs):
        trained[name] = real(model, name, *args, **kwargs)
        if name == "second":  # forgetting: every 'first' image goes to one class
            k = next(k for k in range(3) if share[k] != trained["first"]["accuracy"])
            with torch.no_grad():
                model.heads["first"].weight.zero_()
                model.heads["first"].bias.copy_(torch.nn.functional.one_hot(torch.tensor(k), 3).float())
            trained["damaged_to"] = k
        return trained[name]

    monkeypatch.setattr(continual, "train_domain", train_then_damage_first)
    specs = [
        DomainSpec("first", Toy(24, 3), test_first, config=cfg(epochs=2), data_config=SIZE),
        DomainSpec("second", Toy(24, 5, seed=2), Toy(10, 5, seed=3), config=cfg(steps=3), data_config=SIZE),
    ]
    r = train_sequence(make_model(), specs).report
    assert r.matrix[1, 0] == share[trained["damaged_to"]] != r.matrix[0, 0]
    assert r.bwt == r.matrix[1, 0] - r.matrix[0, 0]
