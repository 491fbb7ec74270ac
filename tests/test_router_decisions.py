"""What a route says besides the domain, and what it checks: `confidence` (how typical the image is of
its domain), `margin` and `posterior`; a warning when the domains preprocess differently; a consistent
set of domains while another thread adds or removes one."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from router_support import (
    COLOURS,
    batches,
    colour_model,
    images,
    unknown,
    without_open_calibration,
)

from adapterkit import AdapterModel
from adapterkit.signature import typicality


@pytest.fixture(scope="module")
def model():
    return colour_model()


def test_confidence_is_how_typical_the_image_is_of_its_domain_and_tells_unknown_images_apart(model):
    """`confidence` was the posterior among the loaded domains, 1.0 for unknown images too; it is now
    where the image's score sits among its domain's own held-out images, which a user can threshold."""
    own = torch.cat([images(c, 32, seed=200 + i) for i, c in enumerate(COLOURS)])
    routed, strange = model.route(own), model.route(unknown(16, seed=5))
    assert bool(((routed.confidence >= 0) & (routed.confidence <= 1)).all())
    assert 0.3 < float(routed.confidence.median()) < 0.7  # a typical image sits mid-distribution
    assert float(strange.confidence.max()) < 0.01 < float(routed.confidence.quantile(0.05))
    assert bool((strange.posterior > 0.99).all())  # what it was: no use for unknown images
    chosen = [model.signatures[b] for b in routed.best]  # the same number the signature reads
    assert torch.equal(routed.confidence, typicality(routed.scores.max(dim=1).values, chosen))
    top2 = routed.scores.topk(2, dim=1).values
    assert torch.equal(routed.margin, top2[:, 0] - top2[:, 1])
    assert torch.equal(model.route(own, classify=True).confidence, routed.confidence)


def test_a_signature_without_score_quantiles_routes_with_a_nan_confidence(model, tmp_path):
    """Signatures written before the open-set calibration have no score quantiles: they still load and
    route, with `confidence` NaN (documented fallback; `margin` and `posterior` are still there)."""
    loaded = without_open_calibration(model, tmp_path / "fam")
    routed = loaded.route(torch.cat([images("red", 4, seed=11), images("blue", 4, seed=12)]))
    assert routed.best == ["red"] * 4 + ["blue"] * 4
    assert bool(routed.confidence[:4].isnan().all()) and not bool(routed.confidence[4:].isnan().any())
    assert bool(torch.isfinite(routed.margin).all())


def two_domains(**configs) -> AdapterModel:
    """A model of the domains `red` and `green` with signatures, each with its data config."""
    model = AdapterModel.from_backbone("test_resnet")
    for i, colour in enumerate(("red", "green")):
        model.add_domain(colour, num_classes=2, data_config=configs.get(colour))
        model.fit_signature(colour, batches(images(colour, 48, seed=i)))
    return model.eval()


def test_route_warns_once_when_the_domains_preprocess_differently():
    """route(x) scores every domain on one tensor: when the domains' data configs differ it says which
    domains and what differs, once (the service and `adapterkit predict` preprocess per domain)."""
    model = two_domains(red={"input_size": (3, 32, 32), "std": (0.25, 0.25, 0.25)})
    x = images("red", 4, seed=3)
    differ = r"data configs differ \(input_size: red \[3, 32, 32\], green \[3, 160, 160\]; std: red"
    with pytest.warns(UserWarning, match=differ) as w:
        model.route(x)
        model.route(x)
        with torch.no_grad():
            model(x, domain="auto")
    assert len([m for m in w if "data configs differ" in str(m.message)]) == 1
    assert w[0].filename == __file__  # names the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two_domains().route(x)  # one config: nothing to say


def test_removing_a_domain_while_another_thread_routes_waits_for_the_route():
    """A removal from another thread used to land mid-route, and route raised `KeyError: unknown domain
    'green' ... add it with add_domain()`; the route now holds the model's lock, so it answers from the
    domains it started with and the removal runs after it."""
    model = two_domains()
    x = torch.cat([images("red", 2, seed=5), images("green", 2, seed=6)])
    remover = threading.Thread(target=model.remove_domain, args=("green",))

    def remove_meanwhile(module, args):
        if not remover.is_alive() and "green" in model.domains:
            remover.start()
            remover.join(timeout=2.0)  # finishes at once unless the route holds the lock

    handle = model.backbone.register_forward_pre_hook(remove_meanwhile)
    try:
        routed = model.route(x, classify=True)
    finally:
        handle.remove()
    remover.join()
    assert routed.best == ["red"] * 2 + ["green"] * 2 and routed.logits.shape[0] == 4
    assert model.domains == ["red"] and model.route(x).names == ["red"]


def test_removing_a_domain_while_the_forward_routes_waits_for_the_forward():
    """`model(x, domain="auto")` routes, then runs: both on one set of domains, so a removal from another
    thread waits (before: it could land between the two, and the forward raised `KeyError`)."""
    model = two_domains()
    x = torch.cat([images("red", 2, seed=5), images("green", 2, seed=6)])
    remover = threading.Thread(target=model.remove_domain, args=("green",))
    calls = []

    def remove_meanwhile(module, args):
        calls.append(1)
        if len(calls) == 1:  # the route's own pass over the backbone
            remover.start()
            remover.join(timeout=0.5)  # finishes at once unless the forward holds the lock

    handle = model.backbone.register_forward_pre_hook(remove_meanwhile)
    try:
        with torch.no_grad():
            logits = model(x, domain="auto")
    finally:
        handle.remove()
    remover.join()
    assert logits.shape[0] == 4 and model.domains == ["red"]
