"""The service's guarantees over real HTTP on loopback (issue 15.4): batched logits agree with
unbatched ones to float rounding, hot-add and removal change no other domain's answer by a bit and fail
no request under load, a domain being removed answers 200 or 404 (never 500), serving changes no
domain's tensors, a full queue answers 503 with Retry-After while health and metrics still answer."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

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
    perturb,
    predict_json,
    running,
    states,
)

from adapterkit import AdapterModel
from adapterkit.serve import create_app

AUTH = {"Authorization": f"Bearer {ADMIN}"}
IMAGES = [image_bytes(seed, size=30 + seed) for seed in range(6)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serve-guarantees") / "fam")


@pytest.fixture(scope="module")
def hub_family(family, registry):
    """The same family on the test registry (hot-adds pull only the one domain's files)."""
    repo = "alice/serve-guarantees"
    AdapterModel.from_pretrained(family).push_to_hub(repo, token=registry.tokens["alice"])
    return repo


def serve(family, domains, **options):
    model = AdapterModel.from_pretrained(family, domains=domains)
    options = {"admin_token": ADMIN, "max_batch_size": 16, "max_wait_ms": 20, **options}
    return model, create_app(model, **options)


def alone(client: httpx.Client, images: list[tuple[str, bytes]]) -> list[list[float]]:
    """Each image in a request of its own, one after another (so each runs in a batch of one)."""
    return [logits_of(predict_json(client, [pair], return_logits=True))[0] for pair in images]


def close(a: list[float], b: list[float]) -> bool:
    a_, b_ = torch.tensor(a), torch.tensor(b)
    return bool((a_ - b_).abs().max() <= 1e-5 * b_.abs().max())


def load(url: str, domains: list[str], stop: threading.Event, clients: int = 3, limit: int = 150) -> list:
    """`clients` threads sending one-image requests (round robin over `domains`) until `stop` is set
    or each sent `limit`; returns every (domain, status)."""

    def worker(k: int) -> list[tuple[str, int]]:
        seen = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(limit):
                if stop.is_set() and i > 2:
                    break
                d = domains[(i + k) % len(domains)]
                seen.append((d, predict_json(client, [(d, IMAGES[i % len(IMAGES)])]).status_code))
        return seen

    with ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(worker, range(clients)) for x in part]


def test_logits_batched_with_other_domains_agree_with_alone(family):
    model, app = serve(family, None)
    images = [(d, IMAGES[i]) for i, d in enumerate(["a", "b", "a", "c", "b", "c"])]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        single = alone(client, images)
        mixed = logits_of(
            predict_json(client, images, return_logits=True)
        )  # one request: one forward per size
        for s, m in zip(single, mixed, strict=True):
            assert close(m, s)
        # across requests: concurrent one-image requests gathered into shared forwards
        for _ in range(3):  # bounded: until a forward held more than one request's image
            before = metric(client.get("/metrics").text, "adapterkit_batch_size_bucket", le="1.0")
            count = metric(client.get("/metrics").text, "adapterkit_batch_size_count")
            with ThreadPoolExecutor(6) as pool:
                answers = list(
                    pool.map(lambda p: logits_of(predict_json(client, [p], return_logits=True)), images)
                )
            for s, (m,) in zip(single, answers, strict=True):
                assert close(m, s)
            text = client.get("/metrics").text
            batched = (metric(text, "adapterkit_batch_size_count") - count) - (
                metric(text, "adapterkit_batch_size_bucket", le="1.0") - before
            )
            if batched:
                break
        assert batched, "concurrent requests never shared a forward"


def test_hot_add_and_removal_leave_other_domains_bit_identical(family, hub_family):
    _, app = serve(family, ["a", "b"])
    request = [("a", IMAGES[0]), ("b", IMAGES[1])]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        before = alone(client, request)
        r = client.post("/v1/domains", json={"source": hub_family, "domain": "c"}, headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "c" and len(r.json()["revision"]) == 40  # pinned to a commit
        assert predict_json(client, [("c", IMAGES[2])]).status_code == 200  # live once answered
        assert alone(client, request) == before
        assert client.delete("/v1/domains/c", headers=AUTH).status_code == 200
        assert alone(client, request) == before
        r = client.post(
            "/v1/domains", json={"source": str(family), "domain": "c", "as_name": "c2"}, headers=AUTH
        )
        assert r.status_code == 201 and r.json()["name"] == "c2"
        assert client.delete("/v1/domains/b", headers=AUTH).status_code == 200
        assert alone(client, request[:1]) == before[:1]


def test_hot_add_and_removal_under_load_fail_no_request(family, hub_family):
    model, app = serve(family, ["a", "b"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            traffic = pool.submit(load, url, ["a", "b"], stop)
            for _ in range(2):
                r = client.post("/v1/domains", json={"source": hub_family, "domain": "c"}, headers=AUTH)
                assert r.status_code == 201, r.text
                assert predict_json(client, [("c", IMAGES[3])]).status_code == 200
                assert client.delete("/v1/domains/c", headers=AUTH).status_code == 200
            stop.set()
            seen = traffic.result()
        assert seen and all(status == 200 for _, status in seen), [s for s in seen if s[1] != 200][:5]
        hot_adds = metric(client.get("/metrics").text, "adapterkit_hot_add_seconds_count", status="ok")
        assert hot_adds == 2 and model.domains == ["a", "b"]


def test_a_domain_being_removed_answers_200_or_404_never_500(family):
    _, app = serve(family, ["a", "b"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            traffic = pool.submit(load, url, ["b", "a"], stop, 3, 60)
            for _ in range(500):  # until b has answered a few requests (bounded)
                text = client.get("/metrics").text
                if metric(text, "adapterkit_predictions_total", domain="b", status="200") >= 3:
                    break
            assert client.delete("/v1/domains/b", headers=AUTH).status_code == 200
            stop.set()
            seen = traffic.result()
        assert {status for d, status in seen if d == "b"} <= {200, 404}
        assert {status for d, status in seen if d == "a"} == {200}
        assert predict_json(client, [("b", IMAGES[0])]).status_code == 404


def test_serving_changes_no_domains_tensors(family, tmp_path):
    served, app = serve(family, None)
    # also a freshly added (trainable) domain of a model left in train mode
    fresh = AdapterModel.from_backbone("test_resnet")
    fresh.add_domain("t", 3, data_config={"input_size": 32})
    perturb(fresh, "t", seed=5)
    fresh.train()
    before = {"served": states(served), "fresh": states(fresh)}
    for model, served_app in ((served, app), (fresh, create_app(fresh, admin_token=ADMIN))):
        with running(served_app) as url, httpx.Client(base_url=url, timeout=60) as client:
            domains = model.domains
            pairs = [(domains[i % len(domains)], IMAGES[i]) for i in range(6)]
            assert predict_json(client, pairs).status_code == 200
            assert all(s == 200 for _, s in load(url, domains, threading.Event(), 2, 6))
    for name, model in (("served", served), ("fresh", fresh)):
        after = states(model)
        for d, tensors in before[name].items():
            assert all(torch.equal(tensors[k], after[d][k]) for k in tensors), f"{name}: domain {d} changed"


def test_mixed_precision_answers_are_the_models_autocast_forward_and_change_no_tensor(family):
    """`mixed_precision="bf16"`: each answer is the model's own bf16-autocast forward of the image, within
    bf16's rounding of the float32 answer (so autocast did run), and the domains' tensors stay float32."""
    model, app = serve(family, None, mixed_precision="bf16")
    before = states(model)
    service = app.state.service
    pairs = [(d, IMAGES[i]) for i, d in enumerate(["a", "b", "c"])]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        answers = alone(client, pairs)
    for (d, data), got in zip(pairs, answers, strict=True):
        x = service.preprocessors.tensor(data, d, "image", service.max_pixels)[None]
        with torch.inference_mode():
            fp32 = model(x, domain=d)[0]
            with torch.autocast("cpu", torch.bfloat16):
                bf16 = model(x, domain=d).float()[0]
        assert torch.equal(torch.tensor(got), bf16)
        assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05 * fp32.abs().max().item())
    after = states(model)
    for d, tensors in before.items():
        assert all(torch.equal(t, after[d][k]) and after[d][k].dtype == t.dtype for k, t in tensors.items())


def test_full_queue_answers_503_with_retry_after_while_health_and_metrics_answer(family):
    _, app = serve(family, ["a", "b"], max_batch_size=1, max_wait_ms=0, queue_size=2, max_images=2)
    pair = [("a", IMAGES[0]), ("b", IMAGES[1])]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        seen_503, health_while_queued = None, False
        for _ in range(5):  # bounded bursts until the queue overflows
            with ThreadPoolExecutor(12) as pool:
                futures = [pool.submit(predict_json, client, pair) for _ in range(24)]
                for _ in range(20):
                    text = client.get("/metrics").text
                    if metric(text, "adapterkit_queue_depth") > 0:
                        health_while_queued = client.get("/healthz").status_code == 200
                        break
                responses = [f.result() for f in futures]
            statuses = {r.status_code for r in responses}
            assert statuses <= {200, 503}, statuses
            seen_503 = next((r for r in responses if r.status_code == 503), None)
            if seen_503 is not None and health_while_queued:
                break
        assert seen_503 is not None, "the queue never overflowed"
        assert seen_503.headers["retry-after"] == "1" and seen_503.json()["error"]["code"] == "overloaded"
        assert health_while_queued, "metrics never showed a queued image while requests were in flight"
        assert predict_json(client, pair).status_code == 200


def test_domains_of_the_family_are_described(family):
    _, app = serve(family, ["b"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        (b,) = client.get("/v1/domains").json()["domains"]
        assert b["name"] == "b" and b["num_classes"] == DOMAINS["b"][0]


def test_a_lone_request_does_not_wait_for_a_batch_to_fill(family):
    """With a 60 s max wait, a request alone is answered well before the client's 30 s timeout: the
    batch waits only for images other requests are decoding."""
    _, app = serve(family, ["a"], max_wait_ms=60_000)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(3):
            assert predict_json(client, [("a", IMAGES[i])]).status_code == 200
