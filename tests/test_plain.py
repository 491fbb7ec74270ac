"""One-domain eval passes through plain module trees (layers/plain.py): the wrappers' bits, never stale,
no extra weights."""

import copy

import pytest
import torch
from checks import fresh, input_for, perturb, run, train_steps
from checks import make_model as make

from adapterkit import AdapterConfig
from adapterkit.compress import append_domain
from adapterkit.layers import AdaptedConv2d, AdaptedLinear, DomainLayer, configure_fusion


def wrapped(model, x, domain):
    """The same pass through the wrappers (the backbone called directly, routed to `domain`)."""
    with torch.no_grad(), model.use_domain(domain):
        return model.heads[domain](model.backbone(x).flatten(1))


def tree(model, domain):
    with torch.no_grad():
        return model._plain.module(model.backbone, domain)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_plain_pass_has_the_wrappers_bits(backbone):
    model = make(backbone)
    x = input_for(model.backbone)
    for d in model.domains:
        y = run(model, x, d)
        assert torch.equal(y, wrapped(model, x, d))
        plain = tree(model, d)
        assert plain is not None and plain is not model.backbone
        left = [m for m in plain.modules() if isinstance(m, DomainLayer)]
        assert all(not getattr(m, "fusable", False) for m in left), "a fusable wrapper left in the tree"
    assert len(model._plain) == 2
    # the model's own modules and tensors are untouched: no tree is a submodule
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())
    assert not any(isinstance(m, DomainLayer) and m.training for m in model.modules())


def test_trees_share_the_fused_weights_and_copy_no_tensor():
    model = make()
    x = input_for(model.backbone)
    run(model, x, "a")
    plain = tree(model, "a")
    fused = {
        id(m.fused._entries["a"].weight)
        for m in model.layers().values()
        if isinstance(m, (AdaptedConv2d, AdaptedLinear)) and m.fusable
    }
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    tensors = [*plain.parameters(), *plain.buffers()]
    weights = {id(m.weight) for m in plain.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert fused and fused <= weights
    assert all(id(t) in own or id(t) in fused for t in tensors)


def test_trees_follow_edits_training_and_domain_changes():
    model = make()
    x = input_for(model.backbone)
    before_b = run(model, x, "b")
    train_steps(model, "b", x)  # optimiser steps, train() and eval()
    assert not torch.equal(run(model, x, "b"), before_b)
    assert torch.equal(run(model, x, "b"), wrapped(model, x, "b"))
    layer = next(m for m in model.layers().values() if isinstance(m, AdaptedConv2d) and m.fusable)
    with torch.no_grad():
        layer.adapters["b"].alpha.add_(0.5)  # in place in eval mode: a version bump
    assert torch.equal(run(model, x, "b"), fresh(model, x, "b"))
    layer.adapters["b"].alpha.data.add_(0.5)  # no version bump: caught by eval(), as the fused cache
    model.eval()
    assert torch.equal(run(model, x, "b"), fresh(model, x, "b"))
    # an adapter replaced by another module, a norm replaced, a domain removed and re-added
    layer.adapters["b"] = copy.deepcopy(layer.adapters["b"])
    with torch.no_grad():
        layer.adapters["b"].alpha.mul_(2)
    assert torch.equal(run(model, x, "b"), fresh(model, x, "b"))
    norm_layer = next(m for m in model.layers().values() if m.rule == "norm")
    norm_layer.adapters["b"] = copy.deepcopy(norm_layer.adapters["b"])
    with torch.no_grad():
        norm_layer.adapters["b"].weight.mul_(3)
    assert torch.equal(run(model, x, "b"), fresh(model, x, "b"))
    model.remove_domain("b")
    assert "b" not in model._plain._trees
    model.add_domain("b", num_classes=4)
    perturb(model, "b", seed=9)
    assert torch.equal(run(model, x, "b"), fresh(model, x, "b"))


def test_trees_follow_basis_dtype_and_fusion_settings():
    model = make(names=("a",))
    x = input_for(model.backbone)
    append_domain(model, "a", new_columns=4)
    ref = run(model, x, "a")
    model.add_domain("b", num_classes=4, factored=True, new_columns=2)
    perturb(model, "b", seed=5)
    before_b = run(model, x, "b")
    append_domain(model, "b")  # a wider beta in every factorable layer
    assert torch.equal(run(model, x, "a"), ref)
    assert torch.equal(run(model, x, "b"), before_b)
    model.to(torch.float64)
    y = run(model, x.double(), "a")
    assert y.dtype == torch.float64 and torch.equal(y, wrapped(model, x.double(), "a"))
    configure_fusion(model, enabled=False)  # unfused wrappers: no tree
    assert tree(model, "a") is None
    assert torch.equal(run(model, x.double(), "a"), wrapped(model, x.double(), "a"))


def test_capacity_bounds_trees_and_fused_weights():
    names = [f"d{i}" for i in range(5)]
    model = make(names=names)
    x = input_for(model.backbone)
    ref = {d: fresh(model, x, d) for d in names}
    configure_fusion(model, capacity=2)
    fused = [
        m.fused
        for m in model.layers().values()
        if isinstance(m, (AdaptedConv2d, AdaptedLinear)) and m.fusable
    ]
    for d in [*names, "d0", "d4", "d0", *names]:
        assert torch.equal(run(model, x, d), ref[d])
        assert len(model._plain) <= 2
        assert all(set(f._entries) <= set(model._plain._trees) for f in fused)
    configure_fusion(model, capacity=0)  # weights rebuilt on every call: no tree holds any
    assert torch.equal(run(model, x, "d1"), ref["d1"]) and tree(model, "d1") is None


def test_hooks_gradients_and_inference_tensors_use_the_wrappers():
    model = make()
    x = input_for(model.backbone)
    ref = run(model, x, "a")
    layer = next(m for m in model.layers().values() if isinstance(m, AdaptedConv2d) and m.fusable)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert torch.equal(run(model, x, "a"), ref) and seen  # a hook added after the tree was built runs
    handle.remove()
    # eval mode with autograd recording: gradients reach the trainable domain's adapters
    model.zero_grad(set_to_none=True)
    model(x, domain="a").sum().backward()
    assert layer.adapters["a"].alpha.grad is not None
    model.set_trainable("a", False)
    assert tree(model, "a") is not None  # frozen: no gradient to give, the tree serves
    with torch.inference_mode():
        built = make(names=("a",))  # inference tensors: no version counter, the wrappers rebuild
        assert built._plain.module(built.backbone, "a") is None
        assert torch.equal(built(x, domain="a"), wrapped(built, x, "a"))


def test_series_wrappers_stay_in_the_tree():
    model = make(config=AdapterConfig(topology="series"))
    x = input_for(model.backbone)
    assert torch.equal(run(model, x, "a"), wrapped(model, x, "a"))
    plain = tree(model, "a")
    assert any(isinstance(m, AdaptedConv2d) and m.rule == "series" for m in plain.modules())


def test_deepcopy_and_training_drop_the_trees():
    model = make()
    x = input_for(model.backbone)
    run(model, x, "a")
    assert len(copy.deepcopy(model)._plain) == 0 and len(model._plain) == 1
    model.train()
    assert len(model._plain) == 0
    model.eval()
    assert torch.equal(run(model, x, "a"), wrapped(model, x, "a"))
