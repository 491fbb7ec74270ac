"""The service's HTTP API over real HTTP on loopback: predict (JSON and multipart), domains, health,
readiness, metrics and the OpenAPI schema."""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from serve_support import (
    ADMIN,
    DOMAINS,
    build_family,
    image_bytes,
    logits_of,
    metric,
    predict_json,
    running,
)

from adapterkit import AdapterModel
from adapterkit.serve import create_app
from adapterkit.transforms import Preprocess, resolve_data_config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serve-api") / "fam")


@pytest.fixture(scope="module")
def server(family):
    model = AdapterModel.from_pretrained(family)
    app = create_app(model, admin_token=ADMIN, max_batch_size=8, max_wait_ms=2, source=str(family))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield model, client


def test_json_predict_answers_each_image_with_its_own_domain_and_labels(server):
    _, client = server
    r = predict_json(client, [("a", image_bytes(0)), ("b", image_bytes(1))], top_k=2)
    assert r.status_code == 200, r.text
    a, b = r.json()["predictions"]
    assert a["domain"] == "a" and a["label"] in DOMAINS["a"][2] and a["label"] == DOMAINS["a"][2][a["index"]]
    assert b["domain"] == "b" and b["label"] == str(b["index"])  # no labels recorded: the index
    for p in (a, b):
        assert [t["index"] for t in p["top_k"]][0] == p["index"] and len(p["top_k"]) == 2
        assert p["top_k"][0]["score"] >= p["top_k"][1]["score"] and 0 < p["score"] <= 1
        assert "logits" not in p


def test_an_answer_says_where_its_time_in_the_server_went(server):
    _, client = server
    r = predict_json(client, [("a", image_bytes(0)), ("c", image_bytes(1))])
    assert r.status_code == 200, r.text
    parts = dict(
        re.fullmatch(r"(\w+);dur=([\d.]+)", p).groups() for p in r.headers["server-timing"].split(", ")
    )
    timing = {name: float(ms) for name, ms in parts.items()}
    assert list(timing) == ["read", "queue", "forward", "total"]
    assert (
        timing["forward"] > 0
        and timing["read"] + timing["queue"] + timing["forward"] <= timing["total"] + 0.02
    )  # (rounding)
    assert "server-timing" not in predict_json(client, [("nope", image_bytes(0))]).headers  # errors: none


def test_logits_are_the_domains_eval_forward_on_its_recorded_preprocessing(server):
    model, client = server
    data = image_bytes(2, size=50)
    served = logits_of(predict_json(client, [("c", data)], return_logits=True))[0]
    assert len(served) == DOMAINS["c"][0]
    info = model.domain_info("c")
    preprocess = Preprocess(resolve_data_config(model.pretrained_cfg, info.data_config))
    import io

    from PIL import Image

    x = preprocess(Image.open(io.BytesIO(data)))
    assert x.shape[-1] == 40
    with torch.inference_mode():
        expected = model(x[None], domain="c")[0]
    assert torch.allclose(torch.tensor(served), expected, rtol=1e-5, atol=1e-6)


def test_multipart_predict_takes_one_domain_per_file_part(server):
    _, client = server
    files = [
        ("image", ("x.png", image_bytes(3), "image/png")),
        ("image", ("y.png", image_bytes(4), "image/png")),
    ]
    r = client.post("/v1/predict", files=files, data={"domain": ["b", "a"], "return_logits": "true"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["domain"] for p in preds] == ["b", "a"] and len(preds[0]["logits"]) == 5
    same = predict_json(client, [("b", image_bytes(3)), ("a", image_bytes(4))], return_logits=True)
    assert logits_of(same) == [p["logits"] for p in preds]


def test_multipart_one_domain_applies_to_every_image(server):
    _, client = server
    files = [("image", (f"{i}.png", image_bytes(i), "image/png")) for i in range(3)]
    r = client.post("/v1/predict", files=files, data={"domain": "a", "top_k": "1"})
    assert r.status_code == 200, r.text
    assert [p["domain"] for p in r.json()["predictions"]] == ["a"] * 3
    assert all(len(p["top_k"]) == 1 for p in r.json()["predictions"])


def test_grey_and_jpeg_images_are_converted_for_the_backbone(server):
    _, client = server
    r = predict_json(client, [("a", image_bytes(5, mode="L")), ("a", image_bytes(6, fmt="JPEG"))])
    assert r.status_code == 200, r.text


def test_domains_lists_classes_labels_origin_and_cost(server):
    model, client = server
    r = client.get("/v1/domains")
    assert r.status_code == 200
    listed = {d["name"]: d for d in r.json()["domains"]}
    assert list(listed) == model.domains
    a = listed["a"]
    assert a["num_classes"] == 3 and a["labels"] == ["cat", "dog", "eel"]
    assert a["parameters"] == model.domain_cost("a")["parameters"] and a["bytes"] > 0
    assert a["data_config"]["input_size"] == [3, 32, 32] and a["source"] is not None
    assert isinstance(a["metrics"], dict)


def test_health_readiness_and_openapi(server):
    _, client = server
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["domains"] == 3
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/domains", "/v1/domains/{name}", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"]
    )
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "PredictRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200
    assert client.get("/no-such-page").status_code == 404
    text = client.get("/metrics").text
    for route in ("/docs", "/openapi.json"):  # counted under their own path, not as unmatched
        assert metric(text, "adapterkit_http_requests_total", route=route, method="GET", status="200") >= 1
    assert metric(text, "adapterkit_http_requests_total", route="unmatched", method="GET", status="404") >= 1


def test_docs_render_offline_from_the_servers_own_files(server):
    _, client = server
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assets = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text)
    assert len(assets) == 3 and all(a.startswith("/docs/static/") for a in assets)
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert "SwaggerUIBundle" in client.get("/docs/static/swagger-ui-bundle.js").text
    for i in range(3):  # missing files: 404, counted under one label (bounded cardinality)
        assert client.get(f"/docs/static/missing-{i}.js").status_code == 404
    text = client.get("/metrics").text
    assert (
        metric(text, "adapterkit_http_requests_total", route="/docs/static", method="GET", status="404") == 3
    )
    assert "missing-0" not in text


def test_docs_behind_a_proxy_prefix_load_their_files_under_it(family):
    """A proxy serves the app under /ak and strips the prefix: the page's URLs must carry it."""
    app = create_app(AdapterModel.from_pretrained(family), source=str(family))
    with running(app, root_path="/ak") as url, httpx.Client(base_url=url, timeout=30) as client:
        page = client.get("/docs")  # what the proxy forwards for /ak/docs
        assert page.status_code == 200
        assets = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text)
        assert "'/ak/openapi.json'" in page.text and all(a.startswith("/ak/docs/static/") for a in assets)
        for asset in assets:
            assert client.get(asset.removeprefix("/ak")).status_code == 200, asset


def test_metrics_count_requests_batches_and_domains(server):
    _, client = server
    before = metric(client.get("/metrics").text, "adapterkit_predictions_total", domain="b", status="200")
    assert predict_json(client, [("b", image_bytes(7))]).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "adapterkit_predictions_total", domain="b", status="200") == before + 1
    assert metric(text, "adapterkit_domains_loaded") == 3
    assert metric(text, "adapterkit_batch_size_count") >= 1
    assert "adapterkit_prediction_seconds_bucket" in text and "adapterkit_queue_depth" in text
    route = metric(text, "adapterkit_http_requests_total", route="/v1/predict", method="POST", status="200")
    assert route >= 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"threads": 0}, "threads"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"fusion_capacity": -1}, "capacity"),
        ({"admin_token": "short"}, "admin_token"),
        ({"max_images": 0}, "max_images=0 must be an int >= 1"),  # were accepted: every request refused
        ({"max_body_bytes": 0}, "max_body_bytes=0 must be"),
        ({"max_pixels": 0}, "max_pixels=0 must be"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8' must be one of: no, bf16, fp16"),
    ],
)
def test_create_app_refuses_bad_options(family, options, match):
    with pytest.raises(ValueError, match=match):
        create_app(AdapterModel.from_pretrained(family, domains=["a"]), **options)


def test_startup_freezes_the_objects_alive_out_of_the_garbage_collector(family):
    import gc

    model = AdapterModel.from_pretrained(family, domains=["a"])
    try:
        gc.unfreeze()
        with running(create_app(model, freeze_gc=False)):
            assert gc.get_freeze_count() == 0
        with running(create_app(model)) as url:
            assert gc.get_freeze_count() > 10_000  # the model, torch, the web stack
            assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        gc.unfreeze()


def test_a_stopping_server_refuses_new_images_with_503_and_fails_readiness(family):
    import signal

    from adapterkit.serve_run import stopping_server

    class Uvicorn:  # the part of uvicorn.Server that stopping_server wraps
        def __init__(self):
            self.signals = []

        def handle_exit(self, sig, frame):
            self.signals.append(sig)

    app = create_app(AdapterModel.from_pretrained(family, domains=["a"]), max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert predict_json(client, [("a", image_bytes(0))]).status_code == 200
        server = stopping_server(Uvicorn(), app)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert server.signals == [signal.SIGTERM]  # uvicorn still drains and stops
        refused = predict_json(client, [("a", image_bytes(0))])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "shutting down" in ready.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200  # the process still answers
