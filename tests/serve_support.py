"""What the serving tests share: a tiny family on disk, a server on a free loopback port, images.

Holds no tests. The family is timm's `test_resnet` with three domains made distinct by a small random
change of their tensors: `a` (3 labelled classes, 32 px), `b` (5 classes, 32 px), `c` (4 classes,
40 px, so its images never share a forward with the others').
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from adapterkit import AdapterModel

torch.set_num_threads(1)
ADMIN = "admin-token-for-serve-tests"
DOMAINS = {"a": (3, 32, ["cat", "dog", "eel"]), "b": (5, 32, None), "c": (4, 40, None)}


def perturb(model: AdapterModel, domain: str, seed: int, scale: float = 0.05) -> None:
    """Non-zero adapters, norms and head for `domain` (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters(domain):
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def build_family(path: Path, domains: dict = DOMAINS, seed: int = 0, backbone_seed: int = 0) -> Path:
    """Save a `test_resnet` family with `domains` (name -> (classes, input size, labels)) to `path`."""
    model = AdapterModel.from_backbone("test_resnet", seed=backbone_seed)
    for i, (name, (classes, size, labels)) in enumerate(domains.items()):
        model.add_domain(name, classes, labels=labels, data_config={"input_size": size})
        perturb(model, name, seed=seed + i)
    model.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any, **config: Any) -> Iterator[str]:
    """Run `app` under uvicorn (with `config`'s settings) on a free loopback port in a thread; yields its
    base URL."""
    config = {"host": "127.0.0.1", "port": free_port(), "log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):  # at most 10 s for startup
        if server.started:
            break
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(20)


def image_bytes(seed: int, size: int = 36, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random image file of `size` x `size` pixels."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def colour_photo(colour: tuple[int, int, int], seed: int, size: int = 32) -> bytes:
    """A PNG of one colour with pixel noise (images of a colour domain)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predict_json(client: httpx.Client, images: list[tuple[str, bytes]], **options: Any) -> httpx.Response:
    body = {"images": [{"domain": d, "data": b64(x)} for d, x in images], **options}
    return client.post("/v1/predict", json=body)


def logits_of(response: httpx.Response) -> list[list[float]]:
    assert response.status_code == 200, response.text
    return [p["logits"] for p in response.json()["predictions"]]


def states(model: AdapterModel) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every domain's tensors (norm statistics included)."""
    return {d: {k: v.detach().clone() for k, v in model.domain_state_dict(d).items()} for d in model.domains}


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text (0.0 when absent); labels in any order."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def answer_to_a_slow_body(host: str, port: int, head: bytes, trickle: bool) -> bytes:
    """Send `head` and part of a body, then nothing (or a byte every 0.4 s, a slow-loris client); the
    server's answer, read until it closes the connection (at most about 30 s)."""
    answer = b""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(head)
        s.settimeout(0.4)
        for _ in range(75):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if trickle:
                    s.sendall(b" ")
                continue
            if not chunk:
                return answer
            answer += chunk
    raise AssertionError(f"the server kept the connection open; it answered {answer[:200]!r}")
