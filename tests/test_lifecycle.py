"""The public lifecycle of domains and the shared basis on `AdapterModel`: loading never changes a
domain, frozen domains keep their norm statistics, removal frees fused weights, `use_domain`, `as_name`,
and the basis changes only through `extend_basis` / `replace_basis`."""

from __future__ import annotations

import pytest
import torch
from checks import input_for, perturb

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.compress import append_domain
from adapterkit.layers import DomainLayer


def state(model: AdapterModel, domain: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.domain_state_dict(domain).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved(tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    for i, name in enumerate(("a", "b")):
        model.add_domain(name, num_classes=3)
        perturb(model, name, seed=i)
    model.save_pretrained(tmp_path / "fam")
    return model, tmp_path / "fam"


def test_loaded_model_is_in_eval_mode_with_frozen_domains(saved):
    _, path = saved
    model = AdapterModel.from_pretrained(path)
    assert not model.training
    assert not any(model.is_trainable(d) for d in model.domains)
    assert not any(p.requires_grad for d in model.domains for p in model.trainable_parameters(d))


def test_loaded_domains_equal_the_saved_ones_and_own_their_tensors(saved):
    original, path = saved
    model = AdapterModel.from_pretrained(path)
    assert model.layers() == {n: m for n, m in model.backbone.named_modules() if isinstance(m, DomainLayer)}
    for d in model.domains:
        assert same(state(model, d), state(original, d))
    backbone = {t.data_ptr() for k, t in model.backbone.state_dict().items() if ".adapters." not in k}
    states = [model.domain_state_dict(d) for d in model.domains]  # alive together: no address reused
    per_domain = [{t.data_ptr() for t in s.values()} for s in states]
    assert not per_domain[0] & per_domain[1] and not (per_domain[0] | per_domain[1]) & backbone


def test_train_mode_forwards_never_change_a_loaded_domain(saved):
    _, path = saved
    model = AdapterModel.from_pretrained(path)
    before = {d: state(model, d) for d in model.domains}
    model.train()
    x = input_for(model.backbone, batch=4)
    model(x, domain="b")  # with autograd recording
    with torch.no_grad():
        model(x, domain="b")
        model(x, domain=["a", "b", "a", "b"])
    assert same(state(model, "a"), before["a"])
    assert same(state(model, "b"), before["b"])  # b was only called, never trained


def test_set_trainable_lets_exactly_that_domain_learn_its_statistics(saved):
    _, path = saved
    model = AdapterModel.from_pretrained(path)
    model.set_trainable("b")
    before = {d: state(model, d) for d in model.domains}
    model.train()
    with torch.no_grad():
        model(input_for(model.backbone, batch=4), domain=["a", "b", "a", "b"])
    assert same(state(model, "a"), before["a"])
    assert not same(state(model, "b"), before["b"])  # its running statistics moved
    assert all(p.requires_grad for p in model.trainable_parameters("b"))
    model.set_trainable("b", False)
    frozen = state(model, "b")
    with torch.no_grad():
        model(input_for(model.backbone, batch=4), domain="b")
    assert same(state(model, "b"), frozen)


def test_added_domains_are_trainable(saved):
    model, _ = saved
    assert model.is_trainable("a")
    model.add_domain("c", num_classes=2)
    assert model.is_trainable("c") and all(p.requires_grad for p in model.trainable_parameters("c"))


def test_use_domain_routes_backbone_calls(saved):
    model, _ = saved
    model.eval()
    x = input_for(model.backbone)
    with torch.no_grad(), model.use_domain("a"):
        features = model.backbone(x)
    with torch.no_grad():
        assert torch.equal(model.heads["a"](features.flatten(1)), model(x, domain="a"))
        assert not torch.equal(features, model.backbone(x))  # outside the block: the plain backbone
    with pytest.raises(KeyError, match="unknown domain 'zzz'"), model.use_domain("zzz"):
        pass


def test_remove_domain_frees_its_fused_weights(saved):
    model, _ = saved
    model.eval()
    with torch.no_grad():
        model(input_for(model.backbone), domain="a")
        model(input_for(model.backbone), domain="b")
    layers = [m for m in model.layers().values() if m.fused is not None]
    assert sum(len(m.fused) for m in layers) > 0
    cached = sum(len(m.fused) for m in layers)
    model.remove_domain("a")
    assert sum(len(m.fused) for m in layers) == cached // 2
    assert all("a" not in m.fused._entries for m in layers)


def test_load_domain_under_another_name(saved):
    model, path = saved
    served = AdapterModel.from_pretrained(path, domains=["a"])
    served.load_domain(path, "a", as_name="a-copy")
    x = input_for(model.backbone)
    with torch.no_grad():
        assert torch.equal(served(x, domain="a-copy"), served(x, domain="a"))
    assert served.domain_info("a-copy").name == "a-copy"
    with pytest.raises(ValueError, match="already loaded"):
        served.load_domain(path, "b", as_name="a")


def factored_model() -> AdapterModel:
    model = AdapterModel.from_backbone("test_resnet", config=AdapterConfig(linear=False))
    model.add_domain("a", num_classes=3, factored=True, new_columns=2)
    perturb(model, "a")
    append_domain(model, "a")
    return model


def test_extend_basis_refuses_a_basis_that_is_not_an_extension():
    model = factored_model()
    basis = model.basis()
    name = next(iter(basis))
    changed = {name: torch.cat([basis[name] + 1, basis[name]], dim=1)}
    with pytest.raises(ValueError, match=f"layer {name} does not extend"):
        model.extend_basis(changed)
    assert torch.equal(model.basis()[name], basis[name])  # nothing installed


def test_extend_basis_keeps_old_domains_and_records_history():
    model = factored_model()
    x = input_for(model.backbone)
    model.eval()
    with torch.no_grad():
        before = model(x, domain="a")
    longer = {n: torch.cat([b, torch.randn(b.shape[0], 1)], dim=1) for n, b in model.basis().items()}
    model.extend_basis(longer, history=model.basis_history + [{"op": "test"}])
    with torch.no_grad():
        assert torch.equal(model(x, domain="a"), before)
    assert [h["op"] for h in model.basis_history] == ["append", "test"]
    record = {"op": "append", "domain": "a", "new_columns": None, "energy": None}  # no budget: exact
    assert model.basis_history[0] == record


def test_replace_basis_needs_every_domain():
    model = factored_model()
    model.add_domain("b", num_classes=2)
    with pytest.raises(ValueError, match=r"every domain; missing \['a', 'b'\]"):
        model.replace_basis(model.basis(), {})


def test_history_is_saved_and_loaded(tmp_path):
    model = factored_model()
    model.save_pretrained(tmp_path / "fam")
    loaded = AdapterModel.from_pretrained(tmp_path / "fam")
    assert loaded.basis_history == model.basis_history
    assert all(torch.equal(loaded.basis()[n], b) for n, b in model.basis().items())


def test_train_domain_resumes_a_loaded_domain_and_leaves_it_frozen(saved):
    from torch.utils.data import TensorDataset

    from adapterkit.train import TrainConfig, train_domain

    _, path = saved
    model = AdapterModel.from_pretrained(path)
    before = state(model, "b")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 3)
    train_domain(model, "b", data, config=TrainConfig(steps=2, batch_size=4, progress=False), resume=True)
    after = state(model, "b")
    assert not same(after, before)  # trained: its tensors and statistics moved
    assert not model.is_trainable("b")  # and frozen again, as loaded
    with torch.no_grad():
        model.train()(input_for(model.backbone, batch=4), domain="b")
    assert same(state(model, "b"), after)
