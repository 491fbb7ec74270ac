"""Requests that name no domain (issue 16.2), over real HTTP on loopback: the server routes each such
image by the domains' signatures, answers with the chosen domain and its confidence exactly as if the
domain had been named, says when an image fits no loaded domain, scores each domain on its own
preprocessing, and refuses to route (409, naming the fix) while a loaded domain has no signature."""

from __future__ import annotations

import io
import logging
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_support import ADMIN, b64, build_family, metric, perturb, predict_json, running

from adapterkit import AdapterModel
from adapterkit.serve import create_app
from adapterkit.signature import DomainSignature
from adapterkit.transforms import Preprocess, resolve_data_config

AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Three domains of noisy single-colour photos, each with its own data config. "green" is preprocessed
# (40 px, its own mean) so that a green photo becomes the same tensor as a red photo does with "red"'s
# config: routing is right only when each domain scores the image as preprocessed with its own config.
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
CONFIGS = {
    "red": {"input_size": 32},
    "green": {"input_size": 40, "mean": (-0.1275, 1.1275, 0.5)},  # the backbone's std: 0.5
    "blue": {"input_size": 32},
}


def photo(colour: str, seed: int, size: int = 36) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def checkerboard(seed: int, size: int = 36) -> bytes:
    """An image of none of the domains."""
    board = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    noise = np.random.default_rng(seed).integers(0, 8, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(board[:, :, None], 3, axis=2) ^ noise).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocessed(model: AdapterModel, domain: str, data: list[bytes]) -> torch.Tensor:
    """Images as the domain's own eval preprocessing makes them (what its signature is fitted on)."""
    preprocess = Preprocess(resolve_data_config(model.pretrained_cfg, model.domain_info(domain).data_config))
    return torch.stack([preprocess(Image.open(io.BytesIO(x))) for x in data])


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)  # the heads add_domain draws: the same family whatever ran before
    model = AdapterModel.from_backbone("test_resnet")
    for i, colour in enumerate(COLOURS):
        model.add_domain(colour, num_classes=3 + i, data_config=CONFIGS[colour])
        perturb(model, colour, seed=i)
        x = preprocessed(model, colour, [photo(colour, seed=1000 * i + k) for k in range(128)])
        model.fit_signature(colour, x.split(16), budget=None)  # test_resnet's domains are a few KB
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, family):
    path = tmp_path_factory.mktemp("serve-route-fam") / "fam"
    family.save_pretrained(path)
    model = AdapterModel.from_pretrained(path)
    with running(create_app(model, admin_token=ADMIN, max_wait_ms=20)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield model, client, path


def close(a: list[float], b: list[float]) -> bool:
    a_, b_ = torch.tensor(a), torch.tensor(b)
    return bool((a_ - b_).abs().max() <= 1e-5 * b_.abs().max())


def test_json_images_without_a_domain_are_routed_and_answered_as_their_domain(served):
    _, client, _ = served
    images = [(c, photo(c, seed=50 + i)) for i, c in enumerate(COLOURS) for _ in range(2)]
    body = {
        "images": [
            {"data": b64(x)} if i % 3 == 0 else {"domain": "auto" if i % 3 == 1 else None, "data": b64(x)}
            for i, (_, x) in enumerate(images)
        ],
        "return_logits": True,
    }
    routed = client.post("/v1/predict", json=body)
    named = predict_json(client, images, return_logits=True)
    assert routed.status_code == 200, routed.text
    for (colour, _), r, n in zip(
        images, routed.json()["predictions"], named.json()["predictions"], strict=True
    ):
        assert (r["domain"], r["routed"], r["unknown"]) == (colour, True, False)
        assert 0.01 < r["confidence"] <= 1.0 and r["margin"] > 0 and "nearest" not in r
        assert (r["label"], r["index"], len(r["top_k"])) == (n["label"], n["index"], len(n["top_k"]))
        assert close(r["logits"], n["logits"])
        assert "routed" not in n and "confidence" not in n  # named domains answer as before


def test_multipart_without_domain_fields_is_routed_and_may_mix_with_named_images(served):
    _, client, _ = served
    files = [("image", ("a.png", photo("green", seed=7), "image/png"))]
    answer = client.post("/v1/predict", files=files)
    assert answer.status_code == 200, answer.text
    assert [(p["domain"], p["routed"]) for p in answer.json()["predictions"]] == [("green", True)]
    files = [
        ("image", (f"{i}.png", photo(c, seed=i), "image/png")) for i, c in enumerate(("red", "blue", "red"))
    ]
    answer = client.post("/v1/predict", files=files, data={"domain": ["green", "", "auto"]})
    assert answer.status_code == 200, answer.text
    got = [(p["domain"], p.get("routed")) for p in answer.json()["predictions"]]
    assert got == [("green", None), ("blue", True), ("red", True)]  # a named domain is never overridden


def test_an_image_of_no_loaded_domain_is_unknown_without_a_class(served):
    _, client, _ = served
    answer = client.post(
        "/v1/predict", json={"images": [{"data": b64(checkerboard(seed=s))} for s in range(3)]}
    )
    assert answer.status_code == 200, answer.text
    for p in answer.json()["predictions"]:
        assert p["domain"] is None and p["unknown"] is True and p["routed"] is True
        assert p["nearest"] in COLOURS and 0.0 <= p["confidence"] < 0.01  # stranger than 99 % of them
        assert not {"label", "index", "score", "top_k"} & set(p)


def test_routing_in_the_server_is_model_route_when_the_domains_share_a_config(served):
    """The server decides as `model.route(x, classify=True)`: unknown after the forward, by the open score;
    raising a domain's `open_threshold` above every score makes its images unknown, though their
    signature scores clear its threshold."""
    _, _, path = served
    model = AdapterModel.from_pretrained(path, domains=["red", "blue"])
    data = [photo(c, seed=300 + i) for i, c in enumerate(("red", "blue", "red"))] + [checkerboard(seed=9)]
    x = preprocessed(model, "red", data)
    with running(create_app(model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for strict in (False, True):
            if strict:
                model.signatures["red"].open_threshold.fill_(math.inf)
            expected = model.route(x, classify=True)
            answer = client.post("/v1/predict", json={"images": [{"data": b64(image)} for image in data]})
            got = answer.json()["predictions"]
            assert [p["domain"] for p in got] == expected.domains
            assert [p.get("nearest", p["domain"]) for p in got] == expected.best
            assert torch.allclose(torch.tensor([p["confidence"] for p in got]), expected.confidence)
            assert torch.allclose(torch.tensor([p["margin"] for p in got]), expected.margin)
    assert expected.domains == [None, "blue", None, None] != model.route(x).domains


def test_a_domain_without_a_signature_makes_routing_refuse_and_named_requests_still_work(
    served, tmp_path, caplog
):
    model, client, _ = served
    old = build_family(tmp_path / "old", domains={"plain": (2, 32, None)})  # written without signatures
    with caplog.at_level(logging.WARNING, logger="adapterkit"):
        added = client.post("/v1/domains", json={"source": str(old), "domain": "plain"}, headers=AUTH)
    assert added.status_code == 201, added.text
    assert added.json()["routable"] is False and "'plain' has no routing signature" in caplog.text
    try:
        listed = {d["name"]: d["routable"] for d in client.get("/v1/domains").json()["domains"]}
        assert listed["plain"] is False and listed["red"] is True
        refused = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=1))}]})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "no_signature" and error["missing"] == ["plain"]
        assert "fit_signature" in error["message"] and "name each image's domain" in error["message"]
        assert predict_json(client, [("plain", photo("red", seed=1))]).status_code == 200
    finally:
        assert client.delete("/v1/domains/plain", headers=AUTH).status_code == 200
    routed = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=1))}]})
    assert routed.json()["predictions"][0]["domain"] == "red"
    text = client.get("/metrics").text
    assert metric(text, "adapterkit_predictions_total", domain="auto", status="409") == 1.0


def test_a_family_without_signatures_answers_409_and_keeps_serving_and_none_loaded_is_503(tmp_path):
    model = AdapterModel.from_pretrained(build_family(tmp_path / "fam"))
    with (
        running(create_app(model, admin_token=ADMIN)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        files = [("image", ("a.png", photo("red", seed=2), "image/png"))]
        refused = client.post("/v1/predict", files=files)
        assert refused.status_code == 409 and refused.json()["error"]["missing"] == ["a", "b", "c"]
        assert client.post("/v1/predict", files=files, data={"domain": "a"}).status_code == 200
        assert client.get("/healthz").status_code == 200
        for name in ("a", "b", "c"):
            assert client.delete(f"/v1/domains/{name}", headers=AUTH).status_code == 200
        empty = client.post("/v1/predict", files=files)
        assert empty.status_code == 503 and empty.json()["error"]["code"] == "not_ready"
        named = client.post("/v1/predict", files=files, data={"domain": "a"}).json()["error"]
        assert "'a' is not loaded (none is); hot-add it" in named["message"]  # was "(loaded: none); pick one"


def test_the_schema_says_the_domain_may_be_left_out(served):
    _, client, _ = served
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "domain" not in schema["ImageIn"].get("required", [])
    assert {"routed", "unknown", "confidence", "nearest"} <= set(schema["Prediction"]["properties"])


def test_a_signature_fitted_on_other_features_is_refused_by_name(served):
    model, client, _ = served
    good = model.signatures["red"]
    model.signatures["red"] = DomainSignature(7, 1)  # as from another backbone
    try:
        refused = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=3))}]})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["missing"] == ["red"] and "fit_signature" in refused.text
    finally:
        model.signatures["red"] = good
    routed = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=3))}]})
    assert routed.json()["predictions"][0]["domain"] == "red"


def test_signatures_reading_different_feature_maps_are_refused(served):
    model, client, _ = served
    good = model.signatures["red"]
    other = DomainSignature(good.num_features, good.mean.shape[0])
    other.load_state_dict(good.state_dict())
    other.maps.fill_(1)  # fitted with fit_signature(..., maps=1), the others with the default
    model.signatures["red"] = other
    try:
        refused = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=3))}]})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "signature_mismatch"  # it has one: no `no_signature`
        assert "maps" in refused.text and "fit_signature" in refused.text
    finally:
        model.signatures["red"] = good
    assert client.get("/healthz").status_code == 200


def test_a_hot_add_whose_signature_reads_other_feature_maps_is_refused_where_it_is_added(served, tmp_path):
    """It was added, and then every routed request got 409 `no_signature`; now the hot-add itself is
    refused (422, naming the maps and the fix) and routing goes on."""
    model, client, _ = served
    other = AdapterModel.from_backbone("test_resnet")
    other.add_domain("purple", num_classes=2, data_config=CONFIGS["red"])
    x = preprocessed(other, "purple", [photo("red", seed=900 + k) for k in range(48)])
    other.fit_signature("purple", x.split(16), maps=1, budget=None)
    other.save_pretrained(tmp_path / "short")
    added = client.post(
        "/v1/domains", json={"source": str(tmp_path / "short"), "domain": "purple"}, headers=AUTH
    )
    assert added.status_code == 422, added.text
    message = added.json()["error"]["message"]
    assert "'purple' reads maps=1" in message and "read maps=0" in message and "fit_signature" in message
    assert "purple" not in model.domains
    routed = client.post("/v1/predict", json={"images": [{"data": b64(photo("red", seed=3))}]})
    assert routed.json()["predictions"][0]["domain"] == "red"


def test_routed_images_count_in_the_metrics_under_the_domain_they_went_to(served):
    """They were all `domain="auto"`; now a routed image counts under the domain routing chose
    (`_unknown` when it fits none), and `adapterkit_routed_total` tells routed from named images."""
    _, client, _ = served

    def counts() -> dict[str, float]:
        text = client.get("/metrics").text
        names = ("blue", "_unknown", "auto")
        out = {d: metric(text, "adapterkit_predictions_total", domain=d, status="200") for d in names}
        return {**out, **{f"routed {d}": metric(text, "adapterkit_routed_total", domain=d) for d in names}}

    before = counts()
    body = {"images": [{"data": b64(photo("blue", seed=s))} for s in (60, 61)]}
    body["images"] += [
        {"data": b64(checkerboard(seed=8))},
        {"domain": "blue", "data": b64(photo("blue", 62))},
    ]
    assert client.post("/v1/predict", json=body).status_code == 200
    after = counts()
    grew = {k: after[k] - before[k] for k in after}
    assert grew == {
        "blue": 3,
        "_unknown": 1,
        "auto": 0,
        "routed blue": 2,
        "routed _unknown": 1,
        "routed auto": 0,
    }


def test_a_routed_image_whose_domain_is_removed_before_its_forward_is_answered_alone(served):
    """It failed its whole request with 503; now that image alone gets an error row (`domains_changed`)
    and the request's other images are answered."""
    _, _, path = served
    model = AdapterModel.from_pretrained(path, domains=["red", "blue"])
    app = create_app(model)
    router = app.state.service.router
    route = router._route

    def route_then_remove(items):  # a removal landing between routing and the forward
        decisions = route(items)
        model.unload_domain("blue")
        return decisions

    router._route = route_then_remove
    images = [photo("red", seed=70), photo("blue", seed=71), photo("red", seed=72)]
    body = {"images": [{"data": b64(x)} for x in images] + [{"domain": "red", "data": b64(images[1])}]}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/predict", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
        assert [p["domain"] for p in got] == ["red", None, "red", "red"]
        assert got[1]["routed"] is True and got[1]["error"]["code"] == "domains_changed"
        assert "'blue' was unloaded" in got[1]["error"]["message"] and "label" not in got[1]
        assert "error" not in got[0] and got[3]["label"] is not None
