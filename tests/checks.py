"""Invariant checks every (backbone, AdapterConfig) case must pass (PEFT's `testing_common` idea)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.family import save_family
from adapterkit.inject import reparameterize
from adapterkit.layers import DomainLayer
from adapterkit.load import load_family


def perturb(model: AdapterModel, domain: str, scale: float = 0.05, seed: int = 0) -> None:
    """Give a domain non-zero adapters (as if trained), so the checks see real adapter outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters(domain):
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def input_for(backbone: nn.Module, batch: int = 2, size: int | None = None, seed: int = 0) -> torch.Tensor:
    c, h, w = backbone.pretrained_cfg["input_size"]
    if size is not None:
        h = w = size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def train_steps(model: AdapterModel, domain: str, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.trainable_parameters(domain), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        logits = model(x, domain=domain)
        loss = nn.functional.cross_entropy(logits, torch.arange(x.shape[0]) % logits.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def check_all(
    backbone: nn.Module, config: AdapterConfig | None, x: torch.Tensor, tmp_path, refuse: str | None = None
) -> None:
    """Identity at attach, gradients only on the active domain, mixed batch == per sample,
    export == unfolded (or refused with a message matching `refuse`), save -> load bit-identical, old
    domain bit-identical after training a new one."""
    backbone = reparameterize(backbone.eval())  # what AdapterModel attaches to (RepVGG: fused branches)
    pristine = copy.deepcopy(backbone)
    with torch.no_grad():
        reference = backbone(x)
    model = AdapterModel(backbone, config).eval()
    assert model.targets, "no layer was adapted"
    head = "backbone" if model.backbone_head is not None else "new"
    model.add_domain("a", head=head, num_classes=None if head == "backbone" else 7)

    # 1. identity at attach time
    with torch.no_grad():
        feats_plain = model.backbone(x)
        with model.router.use("a"):
            feats_a = model.backbone(x)
        assert torch.equal(feats_plain, feats_a)
        if head == "backbone":
            assert torch.equal(model(x, domain="a"), reference)

    # 2. gradients only on the active domain
    model.add_domain("b", num_classes=5)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    model.train()
    model.zero_grad()
    model(x, domain="b").logsumexp(1).sum().backward()
    trainable = {id(p) for p in model.trainable_parameters("b")}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, f"{name} got a gradient while training domain b"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters("b"))
    model.zero_grad(set_to_none=True)
    model.eval()

    # 3. mixed batch == each sample with its own domain
    with torch.no_grad():
        order = ["b", "a"] * x.shape[0]
        order = order[: x.shape[0]]
        mixed = model(x, domain=order)
        for i, d in enumerate(order):
            single = model(x[i : i + 1], domain=d)[0]
            torch.testing.assert_close(mixed[i, : single.shape[0]], single, rtol=1e-5, atol=1e-5)
            assert torch.isinf(mixed[i, single.shape[0] :]).all()

    # 4. export == unfolded
    with torch.no_grad():
        logits_b = model(x, domain="b")
    if refuse is not None:
        with pytest.raises(ValueError, match=refuse):
            model.export_domain("b")
    else:
        exported = model.export_domain("b")
        assert not any(isinstance(m, DomainLayer) for m in exported.modules())
        assert not any("adapters" in n for n, _ in exported.named_modules())
        with torch.no_grad():
            folded = exported(x)
        rel = (folded - logits_b).abs().max() / logits_b.abs().max()
        assert rel <= 1e-5, f"export differs: relative error {rel:.2e}"

    # 5. save -> load gives bit-identical logits
    save_family(model, tmp_path / "family")
    loaded = load_family(AdapterModel, str(tmp_path / "family"), backbone=copy.deepcopy(pristine)).eval()
    with torch.no_grad():
        for d in ("a", "b"):
            assert torch.equal(loaded(x, domain=d), model(x, domain=d)), f"domain {d} changed after save/load"

    # 6. training a new domain leaves the old ones bit-identical (norm statistics included)
    with torch.no_grad():
        before = model(x, domain="a")
    state_a = {k: v.clone() for k, v in model.domain_state_dict("a").items()}
    backbone_state = {k: v.clone() for k, v in model.backbone.state_dict().items() if ".adapters." not in k}
    model.add_domain("c", num_classes=3)
    train_steps(model, "c", x)
    with torch.no_grad():
        assert torch.equal(model(x, domain="a"), before)
    for k, v in model.domain_state_dict("a").items():
        assert torch.equal(v, state_a[k]), f"{k} of domain a changed while training c"
    for k, v in model.backbone.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, backbone_state[k]), f"backbone tensor {k} changed while training c"
