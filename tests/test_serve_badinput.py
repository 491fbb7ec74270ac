"""Bad input to the service: each gets a clear JSON error with the right status, and the server keeps
serving (checked after every test)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import zlib
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image
from serve_support import ADMIN, answer_to_a_slow_body, b64, build_family, image_bytes, predict_json, running
from starlette.requests import Request

from adapterkit import AdapterModel
from adapterkit.serve import create_app
from adapterkit.serve_errors import ServeError, internal_error_handler
from adapterkit.serve_images import decode_image

MAX_BODY = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serve-bad") / "fam")


@pytest.fixture(scope="module")
def client(family):
    model = AdapterModel.from_pretrained(family, domains=["a", "b"])
    app = create_app(
        model, admin_token=ADMIN, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, max_images=4, max_wait_ms=1
    )
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(client):
    yield
    r = predict_json(client, [("a", image_bytes(0))])
    assert r.status_code == 200, f"the server stopped serving after the bad input: {r.text}"


def error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["code"] == code and len(body["message"]) > 20, body
    return body


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_not_an_image(client):
    error(predict_json(client, [("a", b"this is plain text, not an image")]), 400, "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(client, fmt):
    data = image_bytes(1, size=64, fmt=fmt)
    body = error(predict_json(client, [("a", data[: len(data) // 2])]), 400, "truncated_image")
    assert "image 0" in body["message"]


def test_image_over_the_pixel_limit_is_refused_before_decoding(client):
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")  # 16 Mpx that compress to a few KB
    assert len(buffer.getvalue()) < MAX_BODY // 4
    body = error(predict_json(client, [("a", buffer.getvalue())]), 413, "image_too_large")
    assert body["max_pixels"] == MAX_PIXELS


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that says `width` x `height` and holds (almost) no pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_an_image_over_pils_own_limit_says_its_size(client):
    """PIL refuses images over twice its own limit in `Image.open`; the message said only "over PIL's own
    limit", not how large the image was."""
    body = error(predict_json(client, [("a", png_header(20_000, 20_000))]), 413, "image_too_large")
    assert "(400000000 pixels)" in body["message"] and "--max-pixels" in body["message"]
    # a max_pixels above PIL's own limit does not raise that limit: the message said "decoded up to
    # 500000000 pixels" while refusing 400,000,000
    with pytest.raises(ServeError, match=r"over PIL's own limit\); images are decoded up to 178956970 "):
        decode_image(png_header(20_000, 20_000), "image 0", max_pixels=500_000_000)


def test_unsupported_content_type(client):
    r = client.post("/v1/predict", content=b"hello", headers={"content-type": "text/plain"})
    error(r, 415, "unsupported_media_type")
    files = [("image", ("x.pdf", b"%PDF-1.4", "application/pdf"))]
    error(client.post("/v1/predict", files=files, data={"domain": "a"}), 415, "unsupported_media_type")


def test_body_over_the_limit(client):
    big = [("a", image_bytes(i, size=160)) for i in range(4)]
    body = error(predict_json(client, big), 413, "body_too_large")
    assert body["limit"] == MAX_BODY
    assert "--max-body-mb" in body["message"] and "(0.191 MB)" in body["message"]  # the command's flag


def test_multipart_fields_are_checked_like_json_ones(client):
    """A misspelt `domain` field was ignored, so the image was routed (here: 409 `no_signature`, naming
    signatures); `return_logits=maybe` was read as false; unknown fields passed silently."""
    image = [("image", ("x.png", image_bytes(0), "image/png"))]
    r = client.post("/v1/predict", files=image, data={"domian": "a"})
    message = error(r, 422, "invalid_request")["message"]
    assert "'domian'" in message and "image, domain, top_k, return_logits" in message
    error(client.post("/v1/predict", files=image, data={"domain": "a", "topk": "1"}), 422, "invalid_request")
    r = client.post("/v1/predict", files=image, data={"domain": "a", "return_logits": "maybe"})
    assert "return_logits='maybe'" in error(r, 422, "invalid_request")["message"]
    for flag, logits in (("on", True), ("True", True), ("0", False), ("no", False)):
        r = client.post("/v1/predict", files=image, data={"domain": "a", "return_logits": flag})
        assert r.status_code == 200 and ("logits" in r.json()["predictions"][0]) is logits, (flag, r.text)


def test_chunked_body_over_the_limit_is_cut_off(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    error(r, 413, "body_too_large")


def test_body_over_the_limit_is_refused_before_it_is_read(client):
    """The server answers from the Content-Length alone: this request never sends its body."""
    host, port = urlparse(str(client.base_url)).hostname, urlparse(str(client.base_url)).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_a_stalled_or_trickled_body_ends_with_408_and_a_closed_connection(family, trickle):
    """A client that stops sending its body, or sends a byte just before each idle limit, holds its
    connection for about `body_timeout_s`, then gets 408 and the connection is closed."""
    app = create_app(AdapterModel.from_pretrained(family, domains=["a"]), body_timeout_s=1, max_wait_ms=1)
    with running(app) as url:
        head = b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"images": ['
        answer = answer_to_a_slow_body(urlparse(url).hostname, urlparse(url).port, head, trickle)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer
        with httpx.Client(base_url=url, timeout=30) as client:
            assert predict_json(client, [("a", image_bytes(0))]).status_code == 200


def test_unknown_domain_lists_the_loaded_ones(client):
    body = error(
        predict_json(client, [("a", image_bytes(2)), ("nope", image_bytes(3))]), 404, "unknown_domain"
    )
    assert body["loaded"] == ["a", "b"] and "'nope'" in body["message"]
    # an empty name (multipart's way to ask for routing) named no way to route in JSON
    body = error(predict_json(client, [("", image_bytes(2))]), 404, "unknown_domain")
    assert "leave its domain out (or send null or 'auto')" in body["message"]


def test_malformed_json(client):
    r = client.post("/v1/predict", content=b'{"images": [', headers={"content-type": "application/json"})
    error(r, 422, "invalid_request")
    error(client.post("/v1/predict", json={"images": []}), 422, "invalid_request")
    error(client.post("/v1/predict", json={"images": [{"domain": "a"}]}), 422, "invalid_request")
    r = client.post(
        "/v1/domains", content=b"{not json", headers={**admin(), "content-type": "application/json"}
    )
    error(r, 422, "invalid_request")


def test_invalid_base64_and_too_many_images(client):
    r = client.post("/v1/predict", json={"images": [{"domain": "a", "data": "@@not base64@@"}]})
    assert "without line breaks (base64 -w0" in error(r, 400, "invalid_base64")["message"]  # the fix
    many = [{"domain": "a", "data": b64(image_bytes(4, size=8))}] * 5
    error(client.post("/v1/predict", json={"images": many}), 413, "too_many_images")


def test_too_many_multipart_images_or_a_broken_multipart_body(client):
    """Multipart bodies over starlette's limits, or without a boundary, were answered 400 `http_error`
    ("Too many files. Maximum number of files is 4.: POST /v1/predict"), not JSON's 413 `too_many_images`."""
    files = [("image", (f"{i}.png", image_bytes(i, size=8), "image/png")) for i in range(5)]
    body = error(client.post("/v1/predict", files=files, data={"domain": "a"}), 413, "too_many_images")
    assert "at most 4 images" in body["message"]
    r = client.post("/v1/predict", files=files[:1], data={"domain": ["a"] * 13})
    error(r, 413, "too_many_images")
    headers = {"content-type": "multipart/form-data"}  # no boundary
    r = client.post("/v1/predict", content=image_bytes(0), headers=headers)
    assert "missing boundary in multipart" in error(r, 422, "invalid_request")["message"].lower()


def test_admin_endpoints_need_the_token(client, family):
    body = {"source": str(family), "domain": "c"}
    r = client.post("/v1/domains", json=body)
    error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    error(client.post("/v1/domains", json=body, headers=admin("wrong-token-123")), 403, "forbidden")
    error(client.delete("/v1/domains/a"), 401, "unauthorized")
    error(client.delete("/v1/domains/a", headers=admin("wrong-token-123")), 403, "forbidden")
    assert [d["name"] for d in client.get("/v1/domains").json()["domains"]] == ["a", "b"]


def test_a_hot_add_sent_as_form_fields_says_to_send_json(client, family):
    """`curl -F source=... -F domain=...` got 422 "Invalid JSON: invalid number at line 1 column 2"."""
    r = client.post(
        "/v1/domains", data={"source": str(family), "domain": "c"}, files={"x": b""}, headers=admin()
    )
    assert "application/json" in error(r, 415, "unsupported_media_type")["message"]
    r = client.post("/v1/domains", json={"source": str(family), "domain": "../c"}, headers=admin())
    assert "'../c' is not a safe file name" in error(r, 422, "invalid_domain_name")["message"]


def test_the_log_says_why_a_hot_add_failed_and_callers_cannot_write_raw_text_into_it(client, family, caplog):
    """The log said only "hot-add of zzz from fam: error"; a domain name with a line break wrote a line of
    its own, and a path with a terminal escape (DELETE /v1/domains/x%1B[2J, no token needed) reached the
    log as it was."""
    with caplog.at_level(logging.INFO, logger="adapterkit"):
        error(client.delete("/v1/domains/x%1B%5B2J"), 401, "unauthorized")
        body = {"source": str(family), "domain": "c\nINFO hot-add of evil: ok"}
        error(client.post("/v1/domains", json=body, headers=admin()), 422, "invalid_domain_name")
        body = {"source": str(family), "domain": "zzz"}
        error(client.post("/v1/domains", json=body, headers=admin()), 404, "domain_not_found")
    lines = [record.getMessage() for record in caplog.records]
    assert all(line.isprintable() for line in lines), lines
    assert "DELETE '/v1/domains/x\\x1b[2J' from 127.0.0.1" in lines[0]
    assert lines[1].startswith("hot-add of 'c\\nINFO hot-add of evil: ok' from ")
    assert lines[1].split(": ")[-1].startswith("error (422 invalid_domain_name) in ")
    assert lines[2].startswith(f"hot-add of zzz from {family}: error (404 domain_not_found) in ")


def test_admin_endpoints_are_off_without_a_token(family):
    app = create_app(AdapterModel.from_pretrained(family, domains=["a"]))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/domains", json={"source": str(family), "domain": "b"}, headers=admin())
        error(r, 403, "admin_disabled")


def test_hot_add_from_other_backbone_weights_is_a_conflict(client, tmp_path):
    other = build_family(tmp_path / "other", {"z": (2, 32, None)}, backbone_seed=1)
    r = client.post("/v1/domains", json={"source": str(other), "domain": "z"}, headers=admin())
    message = error(r, 409, "backbone_mismatch")["message"]
    assert "weights differ" in message and "own backbone weights" in message and "force" not in message


def test_hot_add_from_another_architecture_names_it_and_the_services_fix(client, family, tmp_path):
    """The message told a running service to "use the backbone architecture ('test_vit')", which it cannot."""
    model = AdapterModel.from_backbone("test_vit")
    model.add_domain("z", num_classes=2)
    model.save_pretrained(tmp_path / "vit")
    r = client.post("/v1/domains", json={"source": str(tmp_path / "vit"), "domain": "z"}, headers=admin())
    message = error(r, 409, "backbone_mismatch")["message"]
    assert "built on 'test_vit'" in message and "own backbone weights ('test_resnet')" in message
    assert "use the backbone architecture" not in message.lower()
    with pytest.raises(
        ValueError, match=r"built on 'test_vit'.*differing layers.*\. Use the backbone architecture"
    ):
        AdapterModel.from_pretrained(family, domains=[]).load_domain(tmp_path / "vit", "z")


def test_hot_add_of_a_loaded_name_is_a_conflict(client, family):
    r = client.post("/v1/domains", json={"source": str(family), "domain": "a"}, headers=admin())
    error(r, 409, "domain_exists")


def test_hot_add_from_a_missing_source_or_domain(client, family, tmp_path):
    r = client.post("/v1/domains", json={"source": str(tmp_path / "none"), "domain": "c"}, headers=admin())
    error(r, 404, "source_not_found")
    r = client.post("/v1/domains", json={"source": "none/", "domain": "c"}, headers=admin())
    assert "none/: no such folder" in error(r, 404, "source_not_found")["message"]  # not a repo id
    r = client.post("/v1/domains", json={"source": str(family), "domain": "zzz"}, headers=admin())
    assert "'zzz'" in error(r, 404, "domain_not_found")["message"]


def test_hot_add_from_a_file_instead_of_a_family_folder(client, family):
    r = client.post(
        "/v1/domains", json={"source": str(family / "adapterkit.json"), "domain": "c"}, headers=admin()
    )
    assert f"pass {family}" in error(r, 422, "invalid_source")["message"]


def test_an_unexpected_error_names_an_id_for_the_log_and_nothing_of_the_exception(caplog):
    request = Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": []})
    with caplog.at_level(logging.ERROR, logger="adapterkit"):
        r = asyncio.run(internal_error_handler(request, OSError("/srv/secret/family is gone")))
    message = json.loads(r.body)["error"]["message"]
    assert r.status_code == 500 and "secret" not in message and "OSError" not in message
    error_id = message.split()[3].rstrip(";")
    assert len(error_id) == 12 and error_id in caplog.text and "/srv/secret/family is gone" in caplog.text


def test_hot_add_from_a_missing_hub_repo(client, registry):
    r = client.post("/v1/domains", json={"source": "alice/no-such-family", "domain": "c"}, headers=admin())
    error(r, 404, "source_not_found")


def test_removing_an_unknown_domain(client):
    error(client.delete("/v1/domains/zzz", headers=admin()), 404, "unknown_domain")


def test_unknown_path_and_method(client):
    error(client.get("/v2/nothing"), 404, "not_found")
    error(client.put("/v1/predict"), 405, "method_not_allowed")


def test_hot_add_of_a_domain_asking_for_a_huge_input_is_refused(client, tmp_path):
    """A family's files are input too: a domain whose data config asks for 30,000 px inputs would make
    every request to it allocate gigabytes, so loading it is refused."""
    evil = build_family(tmp_path / "evil", {"c": (2, 32, None)})
    model = AdapterModel.from_pretrained(evil)
    with pytest.raises(ValueError, match="H and W 1-2048 px"):
        model.add_domain("d", 2, data_config={"input_size": 30000})
    model.domain_info("c").data_config = {"input_size": [3, 30000, 30000]}  # as a crafted file would say
    model.save_pretrained(evil)
    r = client.post("/v1/domains", json={"source": str(evil), "domain": "c"}, headers=admin())
    assert "30000" in error(r, 422, "invalid_family")["message"]
    assert [d["name"] for d in client.get("/v1/domains").json()["domains"]] == ["a", "b"]
    with pytest.raises(ValueError, match=r"c\.safetensors: data config: input_size=\[3, 30000, 30000\]"):
        AdapterModel.from_pretrained(evil)
