"""Frozen domains packed in one buffer per layer (layers/table.py): what a reader sees while a writer changes
a domain, the plain trees' cache beyond the cache of materialised modules, modules of their own, and files
whose tensors need a cast. (Logits of packed domains: tests/test_gathered.py.)"""

from __future__ import annotations

import copy
import threading

import timm
import torch
from checks import input_for, perturb
from torch import nn

from adapterkit import AdapterModel
from adapterkit.layers import plain, table
from adapterkit.layers.table import DomainTable, Packed


def frozen_model(names: list[str]) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model("test_resnet")).eval()
    for i, name in enumerate(names):
        model.add_domain(name, num_classes=3)
        perturb(model, name, seed=i)
        model.set_trainable(name, False)
    return model


def test_a_module_materialised_while_its_domain_is_replaced_is_not_served_afterwards(monkeypatch):
    """A reader builds the old version's module; meanwhile the domain is removed and added again. The module
    it built must not stay cached: later calls serve the new version (they served the old one)."""
    model = frozen_model(["a", "c"])
    x = input_for(model.backbone, batch=1)
    entered, release = threading.Event(), threading.Event()
    build = Packed.module

    def paused(self, own=False):
        module = build(self, own)
        if threading.current_thread().name == "reader" and not entered.is_set():
            entered.set()
            release.wait(30)
        return module

    monkeypatch.setattr(Packed, "module", paused)
    reader = threading.Thread(target=lambda: model(x, domain="c"), name="reader")
    reader.start()
    assert entered.wait(30)
    model.remove_domain("c")
    model.add_domain("c", num_classes=3)
    perturb(model, "c", seed=42)
    model.set_trainable("c", False)
    release.set()
    reader.join(30)
    monkeypatch.setattr(Packed, "module", build)
    with torch.no_grad():
        assert torch.equal(model(x, domain="c"), copy.deepcopy(model)(x, domain="c"))


def test_plain_trees_of_frozen_domains_survive_rebuilt_modules(monkeypatch):
    """More domains in turn than the table keeps materialised modules for: each domain's plain tree is
    keyed on its packed buffers, so it is built once, not on every call."""
    monkeypatch.setattr(table, "VIEWS", 2)
    model = frozen_model([f"d{i}" for i in range(6)])
    for layer in model.layers().values():
        if layer.fused is not None:
            layer.fused.capacity = 8
    builds = []
    insert = plain.PlainPasses._insert
    monkeypatch.setattr(
        plain.PlainPasses, "_insert", lambda self, *a: builds.append(a[2]) or insert(self, *a)
    )
    x = input_for(model.backbone, batch=1)
    with torch.no_grad():
        first = [model(x, domain=d) for d in model.domains]
        assert len(builds) == 6
        again = [model(x, domain=d) for d in model.domains]
    assert len(builds) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_a_domain_published_trainable_from_a_file_trains(tmp_path):
    from adapterkit.load import build_domain

    frozen_model(["a"]).save_pretrained(tmp_path / "fam")
    torch.manual_seed(0)
    model = AdapterModel.from_pretrained(
        tmp_path / "fam", domains=[], backbone=timm.create_model("test_resnet")
    )
    info, adapters, head, signature = build_domain(model, "a", tmp_path / "fam" / "domains" / "a.safetensors")
    assert any(isinstance(a, Packed) for a in adapters.values())
    model.publish_domain(info, adapters, head, signature=signature, trainable=True)
    assert all(p.requires_grad for p in model.trainable_parameters("a"))
    assert not any(layer.adapters.is_packed("a") for layer in model.layers().values())


def test_unpacked_and_exported_norms_own_just_their_tensors():
    model = frozen_model(["a"])
    model.set_trainable("a", True)
    norm = next(layer.adapters["a"] for layer in model.layers().values() if layer.rule == "norm")
    for t in (norm.weight, norm.running_mean, norm.running_var):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    model.set_trainable("a", False)
    exported = model.export_domain("a")
    bn = next(m for m in exported.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean.untyped_storage().nbytes() == bn.running_mean.numel() * 4


def test_a_file_tensor_of_another_dtype_loads_whether_or_not_its_layout_is_known():
    def build(state):
        norm = nn.BatchNorm2d(4)
        norm.load_state_dict(state)
        return norm

    good = nn.BatchNorm2d(4).state_dict()
    ints = {k: v.round().long() if k == "weight" else v for k, v in good.items()}  # an integer 'weight'
    known = DomainTable()
    known.pack_state(good, lambda: build(good))  # the layout is now known: no module is built
    record = known.pack_state(ints, lambda: build(ints))
    assert record.flat.dtype == torch.float32
    assert torch.equal(record.state()["weight"], ints["weight"].float())


def test_domains_added_after_to_share_the_earlier_domains_layout():
    model = frozen_model(["a"]).to(torch.float64)
    model.add_domain("b", num_classes=3)
    perturb(model, "b", seed=1)
    model.set_trainable("b", False)
    assert all(layer.adapters.packed_rows(("a", "b")) is not None for layer in model.layers().values())
