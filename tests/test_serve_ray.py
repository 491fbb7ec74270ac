"""The HTTP API on Ray Serve (issue 15.6), on a local Ray instance with 2 CPUs: two replicas answer
exactly as the embedded server does, a hot-add through one replica reaches both, a second family is
served by id (`serve_multiplexed_model_id`), and `GET /metrics` answers every replica's metrics."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_support import (
    ADMIN,
    b64,
    build_family,
    free_port,
    image_bytes,
    logits_of,
    predict_json,
    running,
)

from adapterkit import AdapterModel
from adapterkit.serve import create_app
from adapterkit.serve_metrics import Metrics

ray = pytest.importorskip("ray", reason='Ray Serve is an extra: pip install -e ".[serve-ray]"')
pytestmark = pytest.mark.slow
REPLICA_HEADER = "x-adapterkit-replica"

IMAGES = [("a", image_bytes(0)), ("b", image_bytes(1)), ("a", image_bytes(2))]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    return build_family(root / "fam"), build_family(root / "other", {"z": (2, 32, None)}, seed=7)


@pytest.fixture(scope="module")
def ray_url(families):
    from ray import serve

    from adapterkit.serve_ray import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(
            str(families[0]),
            domains=["a", "b"],
            families=[str(families[1])],
            num_replicas=2,
            ray_actor_options={"num_cpus": 0.5},
            admin_token=ADMIN,
            max_wait_ms=2,
        )
        serve.run(app, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers_as_the_embedded_server(families, ray_url):
    model = AdapterModel.from_pretrained(families[0], domains=["a", "b"])
    with running(create_app(model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        embedded = [logits_of(predict_json(client, [pair], return_logits=True))[0] for pair in IMAGES]
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        for _ in range(2):  # requests land on either replica
            served = [logits_of(predict_json(client, [pair], return_logits=True))[0] for pair in IMAGES]
            assert served == embedded
        names = [d["name"] for d in client.get("/v1/domains").json()["domains"]]
        assert names == ["a", "b"]


def test_a_hot_add_reaches_every_replica(families, ray_url):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        assert client.post("/v1/domains", json={"source": "x", "domain": "c"}).status_code == 401
        r = client.post("/v1/domains", json={"source": str(families[0]), "domain": "c"}, headers=auth)
        assert r.status_code == 201, r.text
        answers = [predict_json(client, [("c", image_bytes(i))]) for i in range(16)]
        assert [a.status_code for a in answers] == [200] * 16
        assert len({a.headers[REPLICA_HEADER] for a in answers}) == 2  # both replicas served c
        assert client.delete("/v1/domains/c", headers=auth).status_code == 200
        statuses = [predict_json(client, [("c", image_bytes(i))]).status_code for i in range(16)]
        assert statuses == [404] * 16


def test_families_are_multiplexed_by_id(families, ray_url):
    header = {"serve_multiplexed_model_id": str(families[1])}
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        body = {"images": [{"domain": "z", "data": b64(image_bytes(3))}]}
        r = client.post("/v1/predict", json=body, headers=header)
        assert r.status_code == 200, r.text
        assert [d["name"] for d in client.get("/v1/domains", headers=header).json()["domains"]] == ["z"]
        assert predict_json(client, [("z", image_bytes(3))]).status_code == 404  # the default family


def test_an_unknown_family_id_is_a_404(ray_url, tmp_path):
    header = {"serve_multiplexed_model_id": str(tmp_path / "no-such-family")}
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        r = client.get("/v1/domains", headers=header)
        assert r.status_code == 404 and r.json()["error"]["code"] == "family_not_found"
        assert "not served here" in r.json()["error"]["message"]  # only the families the deployment lists


def test_behind_a_route_prefix_a_hot_add_reaches_its_own_apps_replicas_only(families, ray_url):
    """A second app at /p: its hot-add reaches both of its replicas, not the app at /, and a new deployment
    of the same family starts from the family's files (the change log is the deployment's own)."""
    from ray import serve

    from adapterkit.serve_ray import deployment

    def prefixed():
        return deployment(
            str(families[0]),
            domains=["a"],
            num_replicas=2,
            ray_actor_options={"num_cpus": 0.5},
            admin_token=ADMIN,
        )

    auth = {"Authorization": f"Bearer {ADMIN}"}
    serve.run(prefixed(), name="prefixed", route_prefix="/p")
    try:
        with httpx.Client(base_url=f"{ray_url}/p", timeout=120) as client:
            body = {"source": str(families[0]), "domain": "b", "as_name": "b2"}
            assert client.post("/v1/domains", json=body, headers=auth).status_code == 201
            answers = [predict_json(client, [("b2", image_bytes(i))]) for i in range(16)]
            assert [a.status_code for a in answers] == [200] * 16
            assert len({a.headers[REPLICA_HEADER] for a in answers}) == 2  # both replicas serve b2
        with httpx.Client(base_url=ray_url, timeout=120) as client:
            assert "b2" not in [d["name"] for d in client.get("/v1/domains").json()["domains"]]
        serve.delete("prefixed")
        serve.run(prefixed(), name="prefixed", route_prefix="/p")
        with httpx.Client(base_url=f"{ray_url}/p", timeout=120) as client:
            assert [d["name"] for d in client.get("/v1/domains").json()["domains"]] == ["a"]
    finally:
        serve.delete("prefixed")


def scrape(client: httpx.Client) -> tuple[str, dict[str, list]]:
    """`GET /metrics`: its text and its samples by name."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return r.text, samples


def predictions(samples: dict[str, list]) -> float:
    return sum(s.value for s in samples.get("adapterkit_predictions_total", []))


def test_metrics_answer_every_replica_labelled(ray_url):
    """One scrape through the proxy holds both replicas' samples, each with its `replica` label (the id of
    the `x-adapterkit-replica` header), so summing over replicas counts every image sent."""
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        _, before = scrape(client)
        sent, replicas = 0, set()
        while len(replicas) < 2 and sent < 64:  # until both replicas have answered some
            r = predict_json(client, IMAGES)
            assert r.status_code == 200, r.text
            sent, replicas = sent + len(IMAGES), replicas | {r.headers[REPLICA_HEADER]}
        assert len(replicas) == 2
        text, after = scrape(client)
    assert {s.labels["replica"] for s in after["adapterkit_predictions_total"]} == replicas
    assert {s.labels["replica"] for s in after["adapterkit_domains_loaded"]} == replicas
    assert predictions(after) - predictions(before) == sent
    # one family, both replicas' samples under it
    assert text.count("# TYPE adapterkit_predictions_total counter") == 1
    assert after["adapterkit_metrics_replicas_missing"][0].value == 0
    assert after["adapterkit_metrics_replicas_answered"][0].value == 2


def test_merged_metrics_keep_one_help_and_type_per_family():
    """The merge, without Ray: every sample of every replica, `replica` added to its labels, one
    `# HELP`/`# TYPE` per family, and a text Prometheus parses."""
    from prometheus_client.parser import text_string_to_metric_families

    from adapterkit.serve_ray_metrics import merge

    texts = []
    for replica, n in (("r1", 2), ("r2", 3)):
        metrics = Metrics(lambda: 0, lambda: 2)
        metrics.observe_predictions(["a"] * n, 200, 0.01)
        texts.append((replica, metrics.render().decode()))
    text = merge(texts, answered=3, missing=1).decode()
    for name in ("adapterkit_predictions_total", "adapterkit_prediction_seconds", "adapterkit_queue_depth"):
        assert text.count(f"# HELP {name} ") == 1 and text.count(f"# TYPE {name} ") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {s.labels["replica"]: s.value for s in families["adapterkit_predictions"].samples}
    assert counts == {"r1": 2, "r2": 3}
    assert all(s.labels["domain"] == "a" for s in families["adapterkit_predictions"].samples)
    assert families["adapterkit_metrics_replicas_answered"].samples[0].value == 3
    assert families["adapterkit_metrics_replicas_missing"].samples[0].value == 1


def test_a_replica_that_does_not_answer_is_left_out_and_counted(ray_url):
    """`gather` on a real deployment of two replicas, one of which never answers: the other's answer comes
    back and the silent one is counted as missing (the scrape does not fail)."""
    import asyncio

    from ray import serve

    from adapterkit.serve_ray_metrics import gather

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=0)
    class Replicas:
        def __init__(self):
            self.id = serve.get_replica_context().replica_id.unique_id

        async def answer(self, silent: str | None) -> str:
            if self.id == silent:
                await asyncio.Event().wait()  # never answers
            return self.id

    handle = serve.run(Replicas.bind(), name="replicas", route_prefix=None)
    try:
        ids, missing = asyncio.run(gather(handle, "answer", None, timeout_s=60))
        assert len(set(ids)) == 2 and missing == 0
        answers, missing = asyncio.run(gather(handle, "answer", ids[0], timeout_s=5))
        assert answers == [ids[1]] and missing == 1
    finally:
        serve.delete("replicas")


def test_limits_default_to_the_apps_queue_and_batch():
    """Without Ray running: a replica takes its app's queue, a forward's worth and a margin (not Ray
    Serve's 5), autoscaling aims at a full batch, the caller's values win, and bad ones are refused."""
    from adapterkit.serve_ray import deployment
    from adapterkit.serve_ray_options import PROBE_MARGIN, serve_options

    options = serve_options({"max_batch_size": 8, "queue_size": 40})
    assert options["max_ongoing_requests"] == options["max_queued_requests"] == 40 + 8 + PROBE_MARGIN
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    auto = serve_options({}, num_replicas="auto")
    assert auto["autoscaling_config"] == {"target_ongoing_requests": 32}  # create_app's max_batch_size
    auto = serve_options({}, autoscaling_config={"max_replicas": 4, "target_ongoing_requests": 10})
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"] == {"max_replicas": 4, "target_ongoing_requests": 10}
    mine = serve_options({}, max_ongoing_requests=64, max_queued_requests=-1)
    assert (mine["max_ongoing_requests"], mine["max_queued_requests"]) == (64, -1)
    bad = [
        ({"queue_size": 0}, {}, "queue_size=0"),
        ({"mixed_precision": "fp8"}, {}, "mixed_precision='fp8' must be one of: no, bf16, fp16"),
        ({}, {"max_ongoing_requests": 0}, "max_ongoing_requests=0"),
        ({}, {"num_replicas": 2, "autoscaling_config": {}}, "leave num_replicas out"),
    ]
    for app_options, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            serve_options(app_options, **kwargs)
    with pytest.raises(ValueError, match="pass max_ongoing_requests=... to deployment"):
        deployment("fam", deployment_options={"max_ongoing_requests": 3})


@pytest.fixture(scope="module")
def one_replica(families, ray_url):
    """A deployment of ONE replica at /one with the default limits."""
    from ray import serve

    from adapterkit.serve_ray import deployment

    app = deployment(str(families[0]), domains=["a"], ray_actor_options={"num_cpus": 0.5}, max_wait_ms=50)
    serve.run(app, name="one", route_prefix="/one")
    yield f"{ray_url}/one"
    serve.delete("one")


def batches(client: httpx.Client) -> tuple[float, float]:
    """The replica's forwards of at most 8 images, and all its forwards (`adapterkit_batch_size`)."""
    _, samples = scrape(client)
    at_most_8 = [s.value for s in samples["adapterkit_batch_size_bucket"] if float(s.labels["le"]) == 8]
    return at_most_8[0], samples["adapterkit_batch_size_count"][0].value


def test_one_replica_batches_more_requests_than_ray_serves_default_limit(one_replica):
    """16 clients at once on one replica: some forward runs more than 8 one-image requests. (Ray Serve's
    default max_ongoing_requests, 5, held the others in its proxy: no forward ever ran more than 5.)"""
    with (
        httpx.Client(base_url=one_replica, timeout=120) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        for _ in range(30):  # rounds of 16 requests at once, until one forward ran more than 8
            statuses = pool.map(
                lambda i: predict_json(client, [("a", image_bytes(i))]).status_code, range(16)
            )
            assert list(statuses) == [200] * 16
            at_most_8, forwards = batches(client)
            if forwards > at_most_8:
                break
    assert forwards > at_most_8, f"none of {forwards:.0f} forwards ran more than 8 images"


def stalled_upload(url: str, length: int = 100_000) -> socket.socket:
    """A `POST /v1/predict` of `length` bytes whose body stops after 12: the replica holds the request
    (until the app's body_timeout_s, 60 s)."""
    target = httpx.URL(url)
    sock = socket.create_connection((target.host, target.port), timeout=30)
    head = (
        f"POST {target.path}/v1/predict HTTP/1.1\r\nHost: {target.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"images": [')
    return sock


def test_probes_and_scrapes_answer_while_the_replica_is_saturated(one_replica):
    """With 8 predictions held in the replica (uploads that stall: more than Ray Serve's default 5) and 16
    clients predicting, `/healthz`, `/readyz` and `/metrics` answer (under the old limit they waited in
    the proxy behind the held predictions until the client gave up)."""
    stop = threading.Event()

    def predict(seed: int) -> list[int]:
        with httpx.Client(base_url=one_replica, timeout=60) as client:
            return [
                predict_json(client, [("a", image_bytes(seed))]).status_code
                for _ in range(200)
                if not stop.is_set()
            ]

    stalled = [stalled_upload(one_replica) for _ in range(8)]
    try:
        with ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(predict, i) for i in range(16)]
            try:
                with httpx.Client(base_url=one_replica, timeout=30) as client:
                    for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
                        assert client.get(path).status_code == 200, path
            finally:
                stop.set()
            answered = [status for c in clients for status in c.result()]
        assert answered and set(answered) <= {200, 503}  # predictions answered meanwhile (503: queue full)
    finally:
        for sock in stalled:
            sock.close()


def test_an_upload_over_the_limit_is_refused_before_it_is_read(one_replica):
    """Under Ray Serve too, a Content-Length over max_body_bytes is answered 413 at once, the body unsent:
    the app reads the body as it arrives (the replica used to read it whole first, holding its slot for as
    long as the upload took; and a stalled one, past body_timeout_s, forever)."""
    sock = stalled_upload(one_replica, length=32 * 1024 * 1024 + 1)  # create_app's max_body_bytes, + 1
    try:
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    finally:
        sock.close()


def test_the_callers_limits_hold_and_a_full_proxy_answers_at_once(families, ray_url):
    """`deployment(max_ongoing_requests=1, max_queued_requests=1)`: of three uploads that stall, one takes
    the replica's slot, one waits in the proxy, and the proxy answers the third 503 with Retry-After at
    once (it is not held)."""
    import select

    from ray import serve

    from adapterkit.serve_ray import deployment

    app = deployment(
        str(families[0]),
        domains=["a"],
        ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=1,
        max_queued_requests=1,
        deployment_options={"graceful_shutdown_timeout_s": 0},
    )
    serve.run(app, name="tight", route_prefix="/tight")
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=f"{ray_url}/tight", timeout=30) as client:
            assert client.get("/healthz").status_code == 200  # (the family is loaded)
        held = [stalled_upload(f"{ray_url}/tight") for _ in range(3)]
        answered, _, _ = select.select(held, [], [], 30)  # the held ones answer 408 only after 60 s
        assert answered, "the proxy held every request"
        head = answered[0].recv(4096).decode("latin-1").lower()
        assert head.startswith("http/1.1 503") and "\r\nretry-after: 1\r\n" in head, head
    finally:
        for sock in held:
            sock.close()
        serve.delete("tight")
