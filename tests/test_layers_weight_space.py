"""Layers used without being called (their `.weight` read directly), re-parameterised models, and timm's
fast paths (fused attention, torch.compile in eval mode, channels-last) with adapters attached (issue 17)."""

import copy

import pytest
import timm
import torch
from checks import input_for, perturb, train_steps
from torch import nn

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.inject import reparameterize
from adapterkit.layers import AdaptedConv2d, AdaptedLinear, DomainNorm


def tiny_beit() -> nn.Module:
    # BEiT's attention runs F.linear(x, self.qkv.weight, qkv_bias): it never calls the qkv layer
    torch.manual_seed(0)
    return timm.create_model(
        "beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    ).eval()


def test_weight_read_directly_is_the_domains_folded_weight():
    model = AdapterModel(tiny_beit()).eval()
    model.add_domain("a", num_classes=3)
    qkv = model.backbone.blocks[0].attn.qkv
    assert isinstance(qkv, AdaptedLinear)
    assert qkv.weight is qkv.base_layer.weight  # no domain: the backbone's own tensor
    with torch.no_grad():
        qkv.adapters["a"].beta_own.normal_()
    with model.use_domain("a"):
        expected = qkv.base_layer.weight + qkv.adapters["a"].weight(qkv.beta)
        torch.testing.assert_close(qkv.weight, expected, rtol=0, atol=0)
    # the exported model holds the same weight in the plain layer
    exported = model.export_domain("a")
    with model.use_domain("a"):
        assert torch.equal(exported.blocks[0].attn.qkv.weight, qkv.weight)


def test_adapter_read_in_weight_space_changes_the_output_and_trains():
    """The qkv adapter is seen only through `.weight`: it must move the output, and get gradients."""
    model = AdapterModel(tiny_beit()).eval()
    model.add_domain("a", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x, domain="a")
    qkv = model.backbone.blocks[0].attn.qkv
    model.train()
    model(x, domain="a").sum().backward()
    assert qkv.adapters["a"].beta_own.grad.abs().sum() > 0  # through F.linear(x, qkv.weight)
    assert qkv.base_layer.weight.grad is None
    model.eval()
    with torch.no_grad():
        qkv.adapters["a"].beta_own.normal_()
        after = model(x, domain="a")
        assert not torch.equal(before, after)
        torch.testing.assert_close(model.export_domain("a")(x), after, rtol=1e-5, atol=1e-5)


def test_series_conv_weight_read_folds_weight_and_bias():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    model = AdapterModel(timm.create_model("test_resnet"), AdapterConfig(topology="series"))
    layer = AdaptedConv2d(conv, model.router, "series")
    layer.adapters["a"] = layer.new_adapter()
    with torch.no_grad():
        layer.adapters["a"].alpha.normal_()
    x = torch.randn(1, 4, 8, 8)
    with model.router.use("a"):
        direct = nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
        torch.testing.assert_close(direct, layer(x), rtol=1e-5, atol=1e-5)
    folded = layer.fold("a")
    with model.router.use("a"):
        assert torch.equal(folded.weight, layer.weight) and torch.equal(folded.bias, layer.bias)


def test_norm_read_directly_is_the_domains_copy():
    model = AdapterModel(timm.create_model("test_resnet")).eval()
    model.add_domain("a", num_classes=3)
    norm = next(m for m in model.layers().values() if isinstance(m, DomainNorm))
    assert norm.weight is norm.base_layer.weight
    with model.use_domain("a"):
        assert norm.weight is norm.adapters["a"].weight
        assert norm.running_var is norm.adapters["a"].running_var
        assert norm.eps == norm.base_layer.eps


def test_wrapped_layers_keep_their_settings():
    model = AdapterModel(timm.create_model("test_resnet"))
    for layer in model.layers().values():
        base = layer.base_layer
        if isinstance(layer, AdaptedConv2d):
            assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.groups) == (
                base.in_channels,
                base.out_channels,
                base.kernel_size,
                base.stride,
                base.groups,
            )
        if isinstance(layer, AdaptedLinear):
            assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)


# ---------------------------------------------------------------------- re-parameterisable models
REP_MODELS = [("fastvit_t8", 64), ("repvgg_a0", 64), ("mobileone_s0", 64), ("repghostnet_050", 64)]


@pytest.mark.parametrize("name,size", REP_MODELS, ids=[n for n, _ in REP_MODELS])
def test_reparameterised_by_the_user_or_not(name, size):
    """The same adapted layers whether the user re-parameterised the backbone first or not."""
    torch.manual_seed(0)
    raw = timm.create_model(name).eval()
    user = timm.utils.reparameterize_model(copy.deepcopy(raw))
    x = input_for(raw, size=size)
    with torch.no_grad():
        reference = user(x)
    ours = AdapterModel(raw).eval()
    theirs = AdapterModel(user).eval()
    assert [(t.name, t.rule) for t in ours.targets] == [(t.name, t.rule) for t in theirs.targets]
    assert reparameterize(theirs.backbone) is theirs.backbone  # again: nothing left to fuse, no error
    for model in (ours, theirs):
        model.add_domain("a", head="backbone")
        with torch.no_grad():
            torch.testing.assert_close(model(x, domain="a"), reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- timm's fast paths
def test_vit_keeps_fused_attention():
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model("test_vit")).eval()
    model.add_domain("a", num_classes=3)
    assert all(m.fused_attn for m in model.backbone.modules() if hasattr(m, "fused_attn"))
    x = input_for(model.backbone)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x, domain="a")
    ops = {e.name for e in prof.events()}
    assert any("scaled_dot_product" in op for op in ops), sorted(ops)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_compile_in_eval_mode_is_one_graph(name):
    """torch.compile traces an AdapterModel in eval mode without a graph break (fullgraph), per domain,
    and computes what eager does; the inductor timings are in benchmarks/results/compile.json."""
    torch._dynamo.reset()
    model = AdapterModel(timm.create_model(name)).eval()
    for d in ("a", "b"):
        model.add_domain(d, num_classes=3)
        perturb(model, d, seed=len(d))
    x = input_for(model.backbone)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for d in ("a", "b", "a"):
            torch.testing.assert_close(compiled(x, domain=d), model(x, domain=d), rtol=1e-5, atol=1e-5)
        # weights changed after compiling are used (the graph reads them, it did not bake them in)
        perturb(model, "a", seed=9)
        torch.testing.assert_close(compiled(x, domain="a"), model(x, domain="a"), rtol=1e-5, atol=1e-5)


def test_compile_of_frozen_domains_is_one_graph_once_each_ran():
    """A frozen domain's modules are built from its packed buffers on first use (layers/table.py), which
    dynamo cannot trace: with fullgraph=True each domain runs once eagerly first (docs/layer-rules.md)."""
    torch._dynamo.reset()
    model = AdapterModel(timm.create_model("test_resnet")).eval()
    for d in ("a", "b"):
        model.add_domain(d, num_classes=3)
        perturb(model, d, seed=len(d))
        model.set_trainable(d, False)
    x = input_for(model.backbone)
    with torch.no_grad():
        eager = {d: model(x, domain=d) for d in ("a", "b")}  # the warm-up
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        for d in ("a", "b", "a"):
            torch.testing.assert_close(compiled(x, domain=d), eager[d], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_channels_last(name):
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model(name)).eval()
    model.add_domain("a", num_classes=3)
    perturb(model, "a")
    x = input_for(model.backbone)
    with torch.no_grad():
        expected = model(x, domain="a")
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x_cl, domain="a"), expected, rtol=1e-4, atol=1e-4)
        exported = model.export_domain("a")
        torch.testing.assert_close(exported(x_cl), expected, rtol=1e-4, atol=1e-4)
    train_steps(model, "a", x_cl, steps=1)  # training runs in channels-last too
