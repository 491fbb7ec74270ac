"""Parameter groups: each trains at its own lr scale and weight decay, and the schedule scales each."""

from __future__ import annotations

import pytest
import timm
import torch
from train_support import SIZE, Toy, cfg, fresh_accelerate_state, make_model  # noqa: F401  (autouse fixture)

from adapterkit import AdapterConfig
from adapterkit.loop import _optimizer, plain_groups
from adapterkit.train import TrainConfig, _domain_job, auto_weight_decay, train_domain, train_model
from adapterkit.train_config import HEAD_LR_SCALE, PARALLEL_LR_SCALE
from adapterkit.train_env import seeded


def groups_of(optimizer) -> dict[str, tuple[float, float, int]]:
    return {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}


@pytest.mark.parametrize("topology", ["parallel", "series"])
def test_each_group_has_its_lr_and_weight_decay(topology):
    model = make_model(config=AdapterConfig(topology=topology))
    model.add_domain("d", num_classes=3)
    job = _domain_job(model, "d")
    groups = groups_of(_optimizer(cfg(lr=0.1, head_weight_decay=1e-4), job, 500))
    adapter = "adapter" if topology == "parallel" else "series"
    # a series model keeps parallel-form (low-rank) adapters where a full one would be too large
    assert {adapter, "norm", "head"} <= set(groups) <= {"adapter", "series", "norm", "head"}
    assert sum(n for *_, n in groups.values()) == len(model.trainable_parameters("d"))
    scale = PARALLEL_LR_SCALE if topology == "parallel" else 1.0
    assert groups[adapter][:2] == pytest.approx((0.1 * scale, auto_weight_decay(500)))
    assert groups["norm"][:2] == pytest.approx((0.1, 0.0))  # the paper's decay is for the adapters only
    assert groups["head"][:2] == pytest.approx((0.1 * HEAD_LR_SCALE, 1e-4))
    given = groups_of(_optimizer(cfg(lr=0.1, adapter_lr_scale=2.0, head_lr_scale=0.5), job, 500))
    assert given[adapter][0] == pytest.approx(0.2) and given["head"][0] == pytest.approx(0.05)


def test_a_plain_model_has_backbone_norm_and_head_groups():
    net = timm.create_model("test_resnet", num_classes=3)
    groups = plain_groups(net, list(net.parameters()))
    assert {id(p) for p in groups["head"]} == {id(p) for p in net.get_classifier().parameters()}
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in groups["norm"]} == {id(p) for m in norms for p in m.parameters()}
    assert sum(map(len, groups.values())) == len(list(net.parameters())) and groups["backbone"]


def adapter_and_head_steps(**fields) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain SGD step from a fresh domain: the change of its adapters and of its head."""
    model = make_model()
    config = cfg(steps=1, momentum=0.0, weight_decay=0.0, schedule="constant", **fields)
    train_domain(model, "d", Toy(8, 3), config=config, data_config=SIZE)
    fresh = make_model()
    with seeded(config.seed, torch.device("cpu")):  # as train_domain initialises a new domain's head
        fresh.add_domain("d", num_classes=3)
    with torch.no_grad():
        fresh_head = torch.cat([p.flatten() for p in fresh.heads["d"].parameters()])
        head = torch.cat([p.flatten() for p in model.heads["d"].parameters()]) - fresh_head
    adapters = [layer.adapters["d"] for layer in model.layers().values()]
    alphas = [a.alpha.detach().flatten() for a in adapters if hasattr(a, "alpha")]  # zero at start
    return torch.cat(alphas), head


def test_the_step_applies_each_groups_scale():
    """From the same start every group sees the same gradient, so its step is proportional to its lr."""
    adapters, head = adapter_and_head_steps(adapter_lr_scale=1.0, head_lr_scale=1.0)
    adapters3, head_half = adapter_and_head_steps(adapter_lr_scale=3.0, head_lr_scale=0.5)
    assert adapters.abs().sum() > 0
    torch.testing.assert_close(adapters3, 3 * adapters, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head_half, 0.5 * head, rtol=1e-4, atol=1e-7)


def test_fine_tuning_trains_its_backbone_slower_than_its_head():
    steps = []
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        net = timm.create_model("test_resnet", num_classes=3)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        config = cfg(steps=1, momentum=0.0, weight_decay=0.0, schedule="constant", backbone_lr_scale=scale)
        train_model(net, Toy(8, 3), config=config, data_config=SIZE)
        steps.append({k: v - before[k] for k, v in net.state_dict().items() if v.is_floating_point()})
    conv = "conv1.0.weight"
    head = next(k for k in steps[0] if k.startswith(net.default_cfg["classifier"]) and k.endswith("weight"))
    assert steps[0][conv].abs().sum() > 0
    torch.testing.assert_close(steps[1][conv], 0.1 * steps[0][conv], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(steps[1][head], steps[0][head])


def test_group_settings_are_validated_and_part_of_the_trajectory():
    for bad in ({"adapter_lr_scale": "big"}, {"adapter_lr_scale": 0}, {"head_lr_scale": float("inf")}):
        with pytest.raises(ValueError, match="must be a positive number"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="norm_weight_decay"):
        TrainConfig(norm_weight_decay=-1.0)
    for field in ("adapter_lr_scale", "head_lr_scale", "backbone_lr_scale", "norm_weight_decay"):
        assert field in TrainConfig().trajectory()  # a checkpoint refuses to resume with another value
