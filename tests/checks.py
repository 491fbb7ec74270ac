"""Invariants every (backbone, AdapterConfig) case must pass (PEFT's `testing_common` idea), one check each.

A test module builds each case once (`build_case`, from a module-scoped fixture) and runs every entry
of `INVARIANTS` on it as its own test, so pytest's test id names the invariant and the case that
broke. A check that changes a model (training, gradients) works on its own deep copy; the others
only read the case's models in eval mode without gradients, so the checks are independent of each
other and of their order.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
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


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class CaseSpec:
    """One (backbone, config) case: how to build it and what export must do.

    Attributes:
        name: timm model name.
        config: the adapter rules (None: `AdapterConfig()`).
        kwargs: passed to `timm.create_model`.
        size: input size (None: the model's own).
        refuse: export must raise ValueError matching this (None: export must work).
        id: the case's name in test ids.
    """

    name: str
    config: AdapterConfig | None = None
    kwargs: tuple[tuple[str, object], ...] = ()
    size: int | None = None
    refuse: str | None = None
    id: str = ""

    def __str__(self) -> str:
        return self.id or self.name


@dataclass
class Case:
    """A built case: `model` with domains `a` and `b` as attached (zero adapters), and `trained`, a copy
    with non-zero adapters on both, as if they were trained.

    `a` gets the backbone's own classifier when it has a linear one (then the model's output must
    equal the backbone's), else a new 7-class head; `b` has a new 5-class head. Checks that only read
    (eval mode, no gradients) share these two; a check that changes a model works on `private()`.
    """

    spec: CaseSpec
    model: AdapterModel
    trained: AdapterModel
    pristine: nn.Module  # the reparameterised backbone before adapters were attached
    reference: torch.Tensor  # its logits on x
    x: torch.Tensor
    head: str

    def private(self) -> AdapterModel:
        """A copy of `trained` that the caller may change."""
        return copy.deepcopy(self.trained).eval()


def build_case(spec: CaseSpec) -> Case:
    torch.manual_seed(0)
    backbone = timm.create_model(spec.name, **dict(spec.kwargs))
    x = input_for(backbone, size=spec.size)
    backbone = reparameterize(backbone.eval())  # what AdapterModel attaches to (RepVGG: fused branches)
    pristine = copy.deepcopy(backbone)
    with torch.no_grad():  # frozen, as AdapterModel runs it (kernels may differ when weights need grads)
        reference = copy.deepcopy(backbone).requires_grad_(False)(x)
    model = AdapterModel(backbone, spec.config).eval()
    head = "backbone" if model.backbone_head is not None else "new"
    model.add_domain("a", head=head, num_classes=None if head == "backbone" else 7)
    model.add_domain("b", num_classes=5)
    trained = copy.deepcopy(model)
    perturb(trained, "a", seed=1)
    perturb(trained, "b", seed=2)
    return Case(spec, model, trained, pristine, reference, x, head)


# ---------------------------------------------------------------------- the invariants
def check_identity_at_attach(case: Case, tmp_path: Path) -> None:
    """Zero-initialised adapters and copied norms: the backbone computes what it did before."""
    model, x = case.model, case.x
    assert model.targets, "no layer was adapted"
    with torch.no_grad():
        feats_plain = model.backbone(x)
        for d in ("a", "b"):
            with model.use_domain(d):
                assert torch.equal(model.backbone(x), feats_plain), f"features of new domain {d} differ"
        if case.head == "backbone":
            assert torch.equal(model(x, domain="a"), case.reference), "logits differ from the backbone's"


def check_gradients_only_on_active_domain(case: Case, tmp_path: Path) -> None:
    model, x = case.private(), case.x
    model.train()
    model.zero_grad()
    model(x, domain="b").logsumexp(1).sum().backward()
    trainable = {id(p) for p in model.trainable_parameters("b")}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, f"{name} got a gradient while training domain b"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters("b"))


def check_mixed_batch_equals_per_sample(case: Case, tmp_path: Path) -> None:
    """To float rounding of the logits' scale: a mixed batch adds each sample's adapter to the layer's
    output, where one domain alone runs it fused into the weight (random backbones such as Inception's
    reach logits of 1e8, where rounding alone moves small logits by more than an absolute 1e-5)."""
    model, x = case.trained, case.x
    order = (["b", "a"] * x.shape[0])[: x.shape[0]]
    with torch.no_grad():
        mixed = model(x, domain=order)
        for i, d in enumerate(order):
            single = model(x[i : i + 1], domain=d)[0]
            scale = max(1.0, single.abs().max().item())
            torch.testing.assert_close(mixed[i, : single.shape[0]], single, rtol=1e-5, atol=1e-5 * scale)
            assert torch.isinf(mixed[i, single.shape[0] :]).all()


def check_export_equals_unfolded(case: Case, tmp_path: Path) -> None:
    """The folded plain timm model gives the adapted logits (or export is refused with the reason)."""
    model, x = case.trained, case.x
    if case.spec.refuse is not None:
        with pytest.raises(ValueError, match=case.spec.refuse):
            model.export_domain("b")
        return
    with torch.no_grad():
        logits_b = model(x, domain="b")
    exported = model.export_domain("b")
    assert not any(isinstance(m, DomainLayer) for m in exported.modules())
    assert not any("adapters" in n for n, _ in exported.named_modules())
    with torch.no_grad():
        folded = exported(x)
    rel = (folded - logits_b).abs().max() / logits_b.abs().max()
    assert rel <= 1e-5, f"export differs: relative error {rel:.2e}"


def check_save_load_bit_identical(case: Case, tmp_path: Path) -> None:
    model, x = case.trained, case.x
    save_family(model, tmp_path / "family")
    loaded = load_family(AdapterModel, str(tmp_path / "family"), backbone=copy.deepcopy(case.pristine)).eval()
    with torch.no_grad():
        for d in ("a", "b"):
            assert torch.equal(loaded(x, domain=d), model(x, domain=d)), f"domain {d} changed after save/load"


def check_old_domain_bit_identical_after_training_another(case: Case, tmp_path: Path) -> None:
    """Training a new domain leaves the old ones and the backbone bit-identical (norm statistics included)."""
    model, x = case.private(), case.x
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


INVARIANTS: dict[str, Callable[[Case, Path], None]] = {
    "identity_at_attach": check_identity_at_attach,
    "grads_only_active_domain": check_gradients_only_on_active_domain,
    "mixed_batch_eq_per_sample": check_mixed_batch_equals_per_sample,
    "export_eq_unfolded": check_export_equals_unfolded,
    "save_load_bit_identical": check_save_load_bit_identical,
    "old_domain_kept_after_training": check_old_domain_bit_identical_after_training_another,
}
"""The checks by the name their test ids carry, in the order the style guide lists them."""


# ---------------------------------------------------------------------- concurrency
HANG_GUARD_S = 120.0
"""How long a concurrency test waits for a thread's next call before failing: a bound against a
hang, never a speed requirement (a call takes milliseconds)."""


class Servers:
    """Threads that each call a function in a loop (serving), counting completed calls by outcome.

    Each function returns a label for its outcome (e.g. `"ok"`, `"absent"`) or raises; anything raised
    is recorded in `problems` and the thread keeps serving. `wait` blocks until every thread (or the
    named ones) completed more calls, which proves that the threads ran and that their calls overlap
    whatever the caller is doing meanwhile.

    Example:
        >>> with Servers({"a": lambda: "ok"}) as servers:
        ...     servers.wait(2, "while nothing happens")
        >>> servers.problems
        []
    """

    def __init__(self, calls: dict[str, Callable[[], str]]) -> None:
        self.calls = calls
        self.problems: list[str] = []
        self.counts: dict[str, dict[str, int]] = {name: {} for name in calls}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(n,), daemon=True) for n in calls]

    def _serve(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                label = self.calls[name]()
            except Exception as e:  # noqa: BLE001  (recorded, and the test fails on it)
                label = "error"
                self.problems.append(f"{name}: {type(e).__name__}: {e}")
            with self._cond:
                self.counts[name][label] = self.counts[name].get(label, 0) + 1
                self.counts[name]["total"] = self.counts[name].get("total", 0) + 1
                self._cond.notify_all()

    def total(self, name: str, label: str = "total") -> int:
        with self._cond:
            return self.counts[name].get(label, 0)

    def wait(self, more: int, during: str, label: str = "total", names: list[str] | None = None) -> None:
        """Block until each thread in `names` (default: all) completed `more` further calls with
        outcome `label` (default: any); fail at once when a call went wrong."""
        names = list(self.calls) if names is None else names
        with self._cond:
            start = {n: self.counts[n].get(label, 0) for n in names}

            def done() -> bool:
                return all(self.counts[n].get(label, 0) >= start[n] + more for n in names)

            self._cond.wait_for(lambda: done() or self.problems, timeout=HANG_GUARD_S)
            assert not self.problems, f"{during}: {self.problems[:5]}"
            if not done():
                late = [n for n in names if self.counts[n].get(label, 0) < start[n] + more]
                raise AssertionError(
                    f"threads {late} completed fewer than {more} {label} call(s) {during}; "
                    f"counts {self.counts}, problems {self.problems[:5]}"
                )

    def __enter__(self) -> Servers:
        for t in self._threads:
            t.start()
        self.wait(1, "after starting")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(HANG_GUARD_S)
        assert not any(t.is_alive() for t in self._threads), "a serving thread did not stop"


def make_model(backbone: str = "test_resnet", names=("a", "b"), config=None) -> AdapterModel:
    """A timm test backbone with perturbed domains `names` (3, 4, ... classes), in eval mode."""
    torch.manual_seed(0)
    model = AdapterModel(timm.create_model(backbone), config).eval()
    for i, name in enumerate(names):
        model.add_domain(name, num_classes=3 + i)
        perturb(model, name, seed=i)
    return model


def run(model: AdapterModel, x: torch.Tensor, domain: str) -> torch.Tensor:
    with torch.no_grad():
        return model(x, domain=domain)


def fresh(model: AdapterModel, x: torch.Tensor, domain: str) -> torch.Tensor:
    """The same model with empty caches (a deep copy) gives the reference bits."""
    return run(copy.deepcopy(model).eval(), x, domain)
