"""Eval-mode fusion: adapters added into the layer weights, cached per domain, never stale."""

import copy
import threading

import pytest
import torch
from checks import HANG_GUARD_S, Servers, fresh, input_for, perturb, run, train_steps
from checks import make_model as make

from adapterkit import AdapterConfig
from adapterkit.compress import append_domain
from adapterkit.layers import AdaptedConv2d, AdaptedLinear, FusedWeights, LowRankAdapter, configure_fusion


def fused_layers(model):
    return [m for m in model.layers().values() if isinstance(m, (AdaptedConv2d, AdaptedLinear)) and m.fusable]


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_fused_matches_unfused_and_export(backbone):
    model = make(backbone)
    x = input_for(model.backbone)
    unfused = copy.deepcopy(model)
    configure_fusion(unfused, enabled=False)
    assert fused_layers(model)
    for d in model.domains:
        y = run(model, x, d)
        torch.testing.assert_close(y, run(unfused, x, d), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model.export_domain(d)(x), y, rtol=1e-5, atol=1e-5)
    assert all(len(m.fused) == 2 for m in fused_layers(model))  # one entry per domain served
    assert all(len(m.fused) == 0 for m in fused_layers(unfused))


def test_same_bits_cached_rebuilt_and_with_grad():
    model = make()
    x = input_for(model.backbone)
    first = run(model, x, "a")
    assert all(len(m.fused) == 1 for m in fused_layers(model))
    assert torch.equal(run(model, x, "a"), first)  # from the cache
    assert torch.equal(fresh(model, x, "a"), first)  # rebuilt
    configure_fusion(model, capacity=0)  # rebuilt on every call
    assert torch.equal(run(model, x, "a"), first)
    assert all(len(m.fused) == 0 for m in fused_layers(model))
    with torch.inference_mode():
        assert torch.equal(model(x, domain="a"), first)
    assert torch.equal(model(x, domain="a").detach(), first)  # eval with autograd recording


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_a_weight_fused_under_autocast_serves_float32_calls_with_their_own_bits(backbone):
    """A fused weight cached by a call under bf16 autocast is built in float32 all the same: a later float32
    call gets the bits of a model that never ran under autocast (a low-rank product used to be rounded to
    bf16 and reused)."""
    model, other = make(backbone), make(backbone)
    x = input_for(model.backbone)
    with torch.autocast("cpu", torch.bfloat16):
        run(model, x, "a")
    assert torch.equal(run(model, x, "a"), run(other, x, "a"))


def test_eval_mode_gradients_reach_only_the_active_domain():
    model = make()
    x = input_for(model.backbone)
    unfused = copy.deepcopy(model)
    configure_fusion(unfused, enabled=False)
    for m in (model, unfused):
        m.zero_grad(set_to_none=True)
        m(x, domain="b").logsumexp(1).sum().backward()
    trainable = {id(p) for p in model.trainable_parameters("b")}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name
    for p, q in zip(model.trainable_parameters("b"), unfused.trainable_parameters("b"), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert all(len(m.fused) == 0 for m in fused_layers(model))  # differentiable weights are not cached


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_vit"])
def test_training_folds_adapters_with_the_same_outputs_and_gradients(backbone):
    """Every foldable conv (1x1 and k x k) and linear trains with its adapter folded in (`layers/folded.py`),
    with the outputs and gradients of the separate-adapter form (`enabled=False`)."""
    model = make(backbone).train()
    convs = [m for m in model.layers().values() if isinstance(m, AdaptedConv2d)]
    assert any(m.train_fused and m.base_layer.kernel_size != (1, 1) for m in convs) or backbone == "test_vit"
    assert all(m.train_fused == m.fusable for m in convs)
    unfused = copy.deepcopy(model)
    configure_fusion(unfused, enabled=False)
    x = input_for(model.backbone, batch=4)
    for m in (model, unfused):
        m(x, domain="a").logsumexp(1).sum().backward()
    torch.testing.assert_close(model(x, domain="a"), unfused(x, domain="a"), rtol=1e-4, atol=1e-5)
    # float32 rounding of different summation orders, relative to the size of the gradients
    scale = max(float(q.grad.abs().max()) for q in unfused.trainable_parameters("a"))
    for p, q in zip(model.trainable_parameters("a"), unfused.trainable_parameters("a"), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * scale)
    assert all(p.grad is None for p in model.trainable_parameters("b"))
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    assert all(len(m.fused) == 0 for m in convs)  # training never caches (the weights are about to change)
    # dropout applies to the adapter's input alone, so with dropout every adapter trains unfused
    with_dropout = make(backbone, config=AdapterConfig(dropout=0.1))
    assert not any(m.train_fused for m in with_dropout.layers().values() if isinstance(m, AdaptedConv2d))


def test_cache_follows_training_and_in_place_edits():
    model = make()
    x = input_for(model.backbone)
    ref_a = run(model, x, "a")
    before_b = run(model, x, "b")
    train_steps(model, "b", x)  # optimiser steps bump the versions; train()/eval() clear the cache
    after_b = run(model, x, "b")
    assert not torch.equal(after_b, before_b)
    assert torch.equal(after_b, fresh(model, x, "b"))
    assert torch.equal(run(model, x, "a"), ref_a)
    # in-place edits in eval mode, without a mode switch: the version counter catches them
    layer = fused_layers(model)[0]
    with torch.no_grad():
        next(iter(layer.adapters["b"].parameters())).add_(0.5)
    edited = run(model, x, "b")
    assert not torch.equal(edited, after_b)
    assert torch.equal(edited, fresh(model, x, "b"))
    # load_state_dict copies in place (a version bump too)
    saved = {k: v.clone() for k, v in layer.adapters["b"].state_dict().items()}
    with torch.no_grad():
        next(iter(layer.adapters["b"].parameters())).add_(1.0)
    run(model, x, "b")
    layer.adapters["b"].load_state_dict(saved)
    assert torch.equal(run(model, x, "b"), edited)


def test_data_edits_are_caught_by_eval():
    model = make()
    x = input_for(model.backbone)
    run(model, x, "a")
    layer = fused_layers(model)[0]
    next(iter(layer.adapters["a"].parameters())).data.add_(0.5)  # bypasses the version counter
    model.eval()
    assert torch.equal(run(model, x, "a"), fresh(model, x, "a"))


def test_model_built_in_inference_mode_is_served_and_never_stale():
    # inference tensors have no version counter: their fused weights are rebuilt on every call
    with torch.inference_mode():
        model = make()
        x = input_for(model.backbone)
        ref = fresh(model, x, "a")
        assert torch.equal(model(x, domain="a"), ref)
        layer = fused_layers(model)[0]
        assert len(layer.fused) == 0
        next(iter(layer.adapters["a"].parameters())).add_(0.5)  # in place, invisible to a version check
        edited = model(x, domain="a")
    assert not torch.equal(edited, ref)
    assert torch.equal(edited, fresh(model, x, "a"))


def test_reloaded_domain_of_the_same_name_is_not_stale(tmp_path):
    model = make()
    x = input_for(model.backbone)
    old = run(model, x, "b")
    model.remove_domain("b")
    model.add_domain("b", num_classes=4)
    perturb(model, "b", seed=7)
    new = run(model, x, "b")
    assert not torch.equal(new, old)
    assert torch.equal(new, fresh(model, x, "b"))


def test_appending_basis_columns_rebuilds_and_keeps_bits():
    model = make(names=("a",))
    x = input_for(model.backbone)
    append_domain(model, "a", new_columns=4)
    ref = run(model, x, "a")
    model.add_domain("b", num_classes=4, factored=True, new_columns=2)
    perturb(model, "b", seed=5)
    before_b = run(model, x, "b")
    append_domain(model, "b")  # replaces every factorable layer's beta with a wider one
    assert torch.equal(run(model, x, "a"), ref)
    assert torch.equal(run(model, x, "b"), before_b)


def test_capacity_bounds_the_cache_and_not_the_bits():
    names = [f"d{i}" for i in range(5)]
    model = make(names=names)
    x = input_for(model.backbone)
    ref = {d: fresh(model, x, d) for d in names}
    configure_fusion(model, capacity=2)
    for _ in range(2):
        for d in names:
            assert torch.equal(run(model, x, d), ref[d])
    assert all(len(m.fused) == 2 for m in fused_layers(model))
    mixed = names * 2
    with torch.no_grad():
        out = model(torch.cat([x[:1]] * len(mixed)), domain=mixed)
    for i, d in enumerate(mixed):
        torch.testing.assert_close(out[i, : ref[d].shape[1]], ref[d][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        configure_fusion(model, capacity=-1)


def test_concurrent_readers_with_a_thrashing_cache():
    names = ["a", "b", "c"]
    model = make(names=names)
    configure_fusion(model, capacity=1)  # every switch of domain evicts and rebuilds
    x = input_for(model.backbone)
    ref = {d: fresh(model, x, d) for d in names}
    readers = [f"{d}{i}" for i in range(2) for d in names]
    # Each reader's first call waits inside the first fused layer until every reader is there: six
    # calls of three domains provably in flight at once, all using one single-entry cache.
    together = threading.Barrier(len(readers), timeout=HANG_GUARD_S)
    first_call = threading.local()

    def meet(module, args):
        if not getattr(first_call, "done", False):
            first_call.done = True
            together.wait()

    hook = fused_layers(model)[0].register_forward_pre_hook(meet)
    problems, calls = [], dict.fromkeys(readers, 0)

    def serve(reader):
        d = reader[0]
        try:
            for _ in range(15):
                if not torch.equal(run(model, x, d), ref[d]):
                    problems.append(f"{reader}: wrong output")
                calls[reader] += 1
        except Exception as e:  # a failing thread must fail the test, not just print
            problems.append(f"{reader}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    assert not problems, problems[:5]
    assert calls == dict.fromkeys(readers, 15)


def test_hot_swap_while_fused_readers_serve():
    """A domain removed and re-added under the same name with other tensors while readers serve it:
    no reader ever gets the old fused weights once the new domain is in, nor a mix of the two."""
    model = make(names=("a", "b"))
    x = input_for(model.backbone)
    ref_a, old_b = run(model, x, "a"), run(model, x, "b")
    donor = make(names=("a", "b"))
    perturb(donor, "b", seed=7)
    new_b = run(donor, x, "b")
    assert not torch.equal(new_b, old_b)
    expected_b = {"old": old_b}

    def read_a():
        assert torch.equal(run(model, x, "a"), ref_a), "a: wrong output"
        return "ok"

    def read_b():
        try:
            out = run(model, x, "b")
        except KeyError:
            return "absent"
        for label, ref in expected_b.items():
            if torch.equal(out, ref):
                return label
        raise AssertionError(f"b: output is neither of {sorted(expected_b)}")

    servers = Servers({"a": read_a, "b1": read_b, "b2": read_b})
    with servers:
        servers.wait(2, "with b's old weights fused", label="old", names=["b1", "b2"])
        model.remove_domain("b")
        servers.wait(1, "after b was removed", label="absent", names=["b1", "b2"])
        expected_b = {"new": new_b}  # from here on the old bits would be a stale cache
        model.publish_domain(
            donor.domain_info("b"),
            {n: copy.deepcopy(layer.adapters["b"]) for n, layer in donor.layers().items()},
            copy.deepcopy(donor.heads["b"]),
        )
        servers.wait(2, "after b was re-added", label="new", names=["b1", "b2"])
        servers.wait(2, "after b was re-added")
    assert not servers.problems, servers.problems[:5]


def test_series_and_std_convs_stay_unfused():
    series = make(config=AdapterConfig(topology="series"))
    convs = [m for m in series.layers().values() if isinstance(m, AdaptedConv2d)]
    assert any(m.rule == "series" and not m.fusable for m in convs)
    nf = make("test_nfnet")
    std = [m for m in nf.layers().values() if "Std" in type(m.base_layer).__name__]
    assert std and not any(m.fusable for m in std)
    x = input_for(nf.backbone)
    assert torch.equal(run(nf, x, "a"), fresh(nf, x, "a"))


def test_deepcopy_starts_empty():
    model = make()
    run(model, input_for(model.backbone), "a")
    copied = copy.deepcopy(model)
    assert all(len(m.fused) == 0 for m in fused_layers(copied))
    assert all(len(m.fused) == 1 for m in fused_layers(model))
    assert isinstance(fused_layers(copied)[0].fused, FusedWeights)


@pytest.mark.parametrize("prefix,own", [(0, 3), (4, 0), (4, 3)])
def test_low_rank_basis_is_the_concatenation(prefix, own):
    beta = torch.randn(8, 6)
    a = LowRankAdapter(5, 8, own_columns=own, shared_columns=prefix, conv=False)
    with torch.no_grad():
        a.beta_own.normal_()
    reference = torch.cat([beta[:, :prefix].contiguous(), a.beta_own], dim=1)
    basis = a.basis(beta)
    assert basis.is_contiguous() and torch.equal(basis, reference)
    assert torch.equal(a.weight(beta), reference @ a.gamma.T)
