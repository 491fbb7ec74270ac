"""`GET /metrics` of the registry: scraped over real HTTP after real client traffic, parsed with
prometheus_client's own parser; labels carry route templates, never a (private) repo's name."""

from __future__ import annotations

import subprocess
import sys

import httpx2
import pytest
from adapterkit_registry import RegistryServer
from adapterkit_registry.app import build_router
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "metrics-test-token-0123"
SECRET = "scrape-secret-0123456789abcdef"
PRIVATE = "alice/zz-private-name-7q3"


def scrape(url: str, **headers: str) -> dict[str, list]:
    r = httpx2.get(f"{url}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)} | {"_text": r.text}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_metrics_count_requests_by_route_template_and_never_leak_repo_names(tmp_path):
    data = bytes(range(256)) * 400  # 100 KiB
    with RegistryServer(tmp_path / "root", tokens={TOKEN: ("alice", "write")}) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        api.create_repo(PRIVATE, private=True)
        api.upload_file(path_or_fileobj=data, path_in_repo="weights.bin", repo_id=PRIVATE)
        got = hf_hub_download(PRIVATE, "weights.bin", token=TOKEN, cache_dir=tmp_path / "c", endpoint=srv.url)
        assert open(got, "rb").read() == data
        with pytest.raises(RepositoryNotFoundError):  # anonymous: 404
            HfApi(endpoint=srv.url, token=False).model_info(PRIVATE)
        assert httpx2.get(f"{srv.url}/{PRIVATE}-nope/no/such/endpoint").status_code == 404
        m = scrape(srv.url)
    text = m.pop("_text")
    assert "zz-private-name" not in text and "weights.bin" not in text
    requests = m["adapterkit_registry_http_requests"]
    total = "adapterkit_registry_http_requests_total"
    assert value(requests, total, method="POST", route="/api/repos/create", status="200") == 1
    commit = "/api/{types}/{ns}/{name}/commit/{*rev}"
    resolve = "/{ns}/{name}/resolve/{rev}/{*path}"
    assert value(requests, total, method="POST", route=commit, status="200") == 1
    assert value(requests, total, method="GET", route=resolve, status="200") >= 1
    assert value(requests, total, method="GET", route="/api/{types}/{ns}/{name}", status="404") == 1
    assert value(requests, total, method="GET", route="unmatched", status="404") == 1
    templates = {r.template for r in build_router().routes} | {"unmatched"}
    assert {s.labels["route"] for s in requests} <= templates  # bounded: no raw path ever
    latency = m["adapterkit_registry_http_request_seconds"]
    for route in ("/api/repos/create", commit, resolve):
        method = {"/api/repos/create": "POST", commit: "POST", resolve: "GET"}[route]
        count = value(latency, "adapterkit_registry_http_request_seconds_count", method=method, route=route)
        assert count == value(requests, total, method=method, route=route)
    received = m["adapterkit_registry_http_received_bytes"]
    sent = m["adapterkit_registry_http_sent_bytes"]
    assert value(received, "adapterkit_registry_http_received_bytes_total", route=commit) > len(data)
    assert value(sent, "adapterkit_registry_http_sent_bytes_total", route=resolve) >= len(data)
    assert (
        value(m["adapterkit_registry_http_requests_in_flight"], "adapterkit_registry_http_requests_in_flight")
        == 1
    )


def test_metrics_secret_protects_the_endpoint(tmp_path):
    with RegistryServer(tmp_path / "root", tokens={TOKEN: ("alice", "write")}, metrics_token=SECRET) as srv:
        anonymous = httpx2.get(f"{srv.url}/metrics")
        assert anonymous.status_code == 401 and anonymous.headers["x-error-code"] == "MetricsTokenRequired"
        hub_token = httpx2.get(f"{srv.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert hub_token.status_code == 401  # a Hub token is not the scrape secret
        m = scrape(srv.url, authorization=f"Bearer {SECRET}")
        requests = m["adapterkit_registry_http_requests"]
        assert value(requests, "adapterkit_registry_http_requests_total", route="/metrics", status="401") == 2


def test_metrics_token_file_refusal_is_one_line(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    for path in (short, tmp_path / "missing"):
        r = subprocess.run(
            [sys.executable, "-m", "adapterkit_registry", "serve", "--root", str(tmp_path / "r")]
            + ["--port", "0", "--metrics-token-file", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and "--metrics-token-file" in r.stderr and "Traceback" not in r.stderr, (
            r.stderr
        )
