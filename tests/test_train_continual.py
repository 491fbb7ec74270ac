"""The sequential runner: the accuracy matrix has constant columns (BWT exactly 0); baselines run."""

from __future__ import annotations

from dataclasses import replace

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
    assert result.unchanged == {"first": True, "second": True}  # probe logits bit-identical
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
    torch.manual_seed(1)
    finetune = finetune_baseline("test_resnet", domains(), overrides={"lr": 0.01})
    torch.manual_seed(2)  # the heads come from the config's seed: the caller's RNG changes nothing
    again = finetune_baseline("test_resnet", domains()[:1], overrides={"lr": 0.01})
    assert again.metrics["first"]["train_loss"] == finetune.metrics["first"]["train_loss"]
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
    result = train_sequence(make_model(), specs)
    r = result.report
    assert r.matrix[1, 0] == share[trained["damaged_to"]] != r.matrix[0, 0]
    assert r.bwt == r.matrix[1, 0] - r.matrix[0, 0]
    assert result.unchanged == {"first": False}  # the probe caught it


def test_the_probe_catches_a_change_the_final_row_does_not_reach(monkeypatch):
    """A domain changed and restored between checks: only the probe after that domain sees it, and
    then its row is measured on the full test set."""
    from adapterkit import continual

    real = continual.train_domain
    specs = [*domains()]

    def train_then_nudge_first(model, name, *args, **kwargs):
        metrics = real(model, name, *args, **kwargs)
        if name == "second":
            with torch.no_grad():
                model.heads["first"].bias.add_(1e-3)  # logits move, the accuracy need not
        if name == "third":
            with torch.no_grad():
                model.heads["first"].bias.sub_(1e-3)
        return metrics

    monkeypatch.setattr(continual, "train_domain", train_then_nudge_first)
    result = train_sequence(make_model(), specs)
    assert result.unchanged["first"] is False and result.unchanged["second"] is True
    with pytest.raises(ValueError, match="reevaluate"):
        train_sequence(make_model(), specs, reevaluate="sometimes")


def test_trackers_log_every_row_of_the_matrix(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    specs = [
        DomainSpec(
            d.name, d.train, d.test, config=cfg(steps=2, log_with="tensorboard", output_dir=str(tmp_path))
        )
        for d in domains()[:2]
    ]
    specs = [replace(d, data_config=SIZE) for d in specs]
    result = train_sequence(make_model(), specs, method="parallel")
    logged = {}
    for events in tmp_path.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logged.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    r = result.report.matrix
    assert sorted(logged["sequence/accuracy/first"]) == [
        (1, pytest.approx(r[0, 0])),
        (2, pytest.approx(r[1, 0])),
    ]
    assert logged["sequence/accuracy/second"] == [(2, pytest.approx(r[1, 1]))]
    assert "first/loss" in logged and "second/accuracy" in logged  # the trainings log into the same run
