"""adapterkit quick start: the whole data flow on CPU, offline, in about two minutes.

1. starts an embedded adapter registry on loopback (the Hub API; nothing leaves the machine),
2. publishes a timm backbone to it (the real CIFAR ResNet-20 weights when ../shared/data is there),
3. trains two domains one after another (MNIST digits, then GTSRB traffic signs; synthetic shape
   domains when the real data is absent) and checks the first domain did not move by a single bit,
4. pushes the family, pulls one domain into a fresh model, hot-adds the other while a thread serves,
5. serves the family over HTTP (`adapterkit.serve`): a prediction, then a hot-add while a client keeps asking,
6. exports a domain as a plain timm model with the adapters folded in, and prints a results table.

Run: python examples/quickstart.py [--data-root ../shared/data] [--images 1500] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("ADAPTERKIT_DATA", HERE.parent.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_domain(kind: str, n: int, seed: int):
    """A small synthetic image domain (shapes or stripes), used only when the real data is absent."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    names = ["circle", "square", "triangle", "cross"] if kind == "shapes" else ["h", "v", "d1", "d2"]
    images, labels = [], []
    for i in range(n):
        label = i % len(names)
        img = PILImage.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(img)
        color = tuple(int(c) for c in rng.integers(150, 256, 3))
        x, y, r = (int(v) for v in (rng.integers(10, 22), rng.integers(10, 22), rng.integers(6, 10)))
        box = [x - r, y - r, x + r, y + r]
        if kind == "stripes":
            for k in range(-32, 64, 6):
                draw.line(
                    [(0, k, 32, k), (k, 0, k, 32), (k, 0, k + 32, 32), (k + 32, 0, k, 32)][label],
                    fill=color,
                    width=2,
                )
        elif label == 0:
            draw.ellipse(box, fill=color)
        elif label == 1:
            draw.rectangle(box, fill=color)
        elif label == 2:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        else:
            draw.line([x - r, y, x + r, y], fill=color, width=3)
            draw.line([x, y - r, x, y + r], fill=color, width=3)
        images.append(img)
        labels.append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def load_domains(data_root: Path, n: int):
    """(name, train, test, flip) for two domains: real MNIST and GTSRB, or synthetic stand-ins."""
    if (data_root / "mnist" / "mnist.npz").is_file() and (data_root / "gtsrb").is_dir():
        sys.path.insert(0, str(HERE))
        from data import load_gtsrb, load_mnist

        return "real", [
            (
                "mnist",
                load_mnist(data_root, "train", limit=n),
                load_mnist(data_root, "test", limit=1000),
                False,
            ),
            (
                "gtsrb",
                load_gtsrb(data_root, "train", limit=n),
                load_gtsrb(data_root, "test", limit=1000),
                False,
            ),
        ]
    return "synthetic", [
        ("shapes", synthetic_domain("shapes", n, 0), synthetic_domain("shapes", 400, 1), True),
        ("stripes", synthetic_domain("stripes", n, 2), synthetic_domain("stripes", 400, 3), True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=1500, help="training images per domain")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working folder (registry, caches)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adapterkit-quickstart-"))
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """The six steps above, in order, against a registry that lives in `work`."""
    port = free_port()
    use_local_registry(port, work)

    import torch
    from adapterkit_registry import RegistryServer, create_token

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    token = create_token(work / "registry", "demo", "write")
    with RegistryServer(work / "registry", port=port):
        print(f"[1] registry serving the Hub API at {os.environ['HF_ENDPOINT']} (state in {work})")
        publish_backbone(args.data_root, token)
        model, domains, results, probe = train_domains(args)
        push_family(model, token)
        first, second = domains[0][0], domains[1][0]
        pull_and_hot_add("demo/quickstart", first, second, probe, token)
        serve_over_http("demo/quickstart", first, second, token)
        export_plain_model(model, second, probe[second], domains[1][2])
        print_results(model, results)


def use_local_registry(port: int, work: Path) -> None:
    """Point huggingface_hub (and timm through it) at the embedded registry, caches inside `work`."""
    # huggingface_hub and timm read these when imported: set them first.
    os.environ.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(work / "hf"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # its own registry, its own token
        os.environ.pop(var, None)


def publish_backbone(data_root: Path, token: str) -> None:
    """[2] A timm backbone on the registry, pushed with timm's own `push_to_hf_hub`."""
    import timm

    import adapterkit.backbones  # noqa: F401  (registers adapterkit's CIFAR ResNets with timm)

    weights = data_root / "resnet_cifar10" / "resnet20.safetensors"
    backbone = timm.create_model(
        "cifar_resnet20", pretrained=weights.is_file(), pretrained_cfg_overlay={"file": str(weights)}
    )
    timm.models.push_to_hf_hub(backbone, "demo/cifar-resnet20", token=token)
    origin = "real CIFAR-10 weights" if weights.is_file() else "random weights (no ../shared/data)"
    print(f"[2] published backbone hf-hub:demo/cifar-resnet20 ({origin}) with timm.push_to_hf_hub")


def train_domains(args: argparse.Namespace):
    """[3] Two domains trained one after another on the published backbone. Returns the model, the
    domains, each one's metrics, and each one's logits on a fixed random batch (`probe`): after the
    second domain is trained, the first one's are checked bit for bit."""
    import torch

    from adapterkit import AdapterModel
    from adapterkit.train import TrainConfig, train_domain

    model = AdapterModel.from_backbone("hf-hub:demo/cifar-resnet20", pretrained=True)
    source, domains = load_domains(args.data_root, args.images)
    config = TrainConfig(epochs=args.epochs, batch_size=32, lr=0.1, progress=False)
    results, probe = {}, {}
    for i, (name, train, test, flip) in enumerate(domains):
        cfg = TrainConfig(**{**config.to_dict(), "flip": flip})
        metrics = train_domain(model, name, train, test, cfg)
        results[name] = metrics
        x = torch.stack([torch.randn(3, 32, 32) for _ in range(8)])
        model.eval()
        with torch.no_grad():
            probe[name] = (x, model(x, domain=name))
        print(f"[3] trained {name} ({source} data, {len(train)} images): accuracy {metrics['accuracy']:.3f}")
        if i:
            first, (x0, y0) = domains[0][0], probe[domains[0][0]]
            with torch.no_grad():
                same = torch.equal(model(x0, domain=first), y0)
            print(f"    {first} logits after training {name}: bit-identical = {same}")
            assert same
    return model, domains, results, probe


def push_family(model, token: str) -> None:
    """[4] The family on the registry: its adapters and heads, not the backbone."""
    model.push_to_hub("demo/quickstart", token=token)
    print("[4] pushed family demo/quickstart (adapters only; the backbone is its own repo)")


def pull_and_hot_add(repo_id: str, first: str, second: str, probe: dict, token: str) -> None:
    """[4] `first` pulled into a fresh model that a thread keeps calling while `second` is hot-added:
    the served outputs never change, and the added domain answers as it did when it was trained."""
    import torch

    from adapterkit import AdapterModel

    served = AdapterModel.from_pretrained(repo_id, domains=[first], token=token).eval()
    x0, y0 = probe[first]
    stop, seen = threading.Event(), []

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                seen.append(torch.equal(served(x0, domain=first), y0))

    def calls_reach(n: int) -> None:  # (bounded: the served thread makes a call every few ms)
        deadline = time.monotonic() + 30
        while len(seen) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    thread = threading.Thread(target=serve)
    thread.start()
    calls_reach(3)  # served calls before the hot-add, during it, and after it
    served.load_domain(repo_id, second, token=token)
    calls_reach(len(seen) + 3)
    stop.set()
    thread.join()
    x1, y1 = probe[second]
    with torch.no_grad():
        pulled_ok = torch.equal(served(x1, domain=second), y1)
    print(
        f"    pulled {first} into a fresh model, hot-added {second} during {len(seen)} served calls: "
        f"served outputs unchanged = {all(seen)}, {second} bit-identical = {pulled_ok}"
    )
    assert all(seen) and pulled_ok


def export_plain_model(model, domain: str, probe: tuple, test) -> None:
    """[6] `domain` as a plain timm model, adapters folded in: same logits on the probe batch (up to
    rounding), and its accuracy on the domain's test set."""
    import torch

    from adapterkit.train import evaluate

    x1, y1 = probe
    exported = model.export_domain(domain)
    with torch.no_grad():
        rel = ((exported(x1) - y1).abs().max() / y1.abs().max()).item()
    folded_acc = evaluate(exported, test, data_config=model.domain_info(domain).data_config)
    print(f"[6] exported {domain} as a plain timm model: relative error {rel:.1e}, accuracy {folded_acc:.3f}")


def print_results(model, results: dict) -> None:
    """The results table: each domain's test accuracy and what it added to the backbone."""
    print("\n| domain | test accuracy | added parameters | % of backbone | bytes |")
    print("|---|---|---|---|---|")
    for name, metrics in results.items():
        cost = model.domain_cost(name)
        print(
            f"| {name} | {metrics['accuracy']:.3f} | {cost['parameters']:,} | "
            f"{100 * cost['fraction_of_backbone']:.1f} % | {cost['bytes']:,} |"
        )


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.perf_counter() + seconds
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"waited {seconds} s")
        time.sleep(0.01)


def serve_over_http(source: str, first: str, second: str, token: str) -> None:
    """[5] The family behind adapterkit's HTTP service: a prediction, then a hot-add while a client asks."""
    import httpx
    import numpy as np
    import uvicorn
    from PIL import Image

    from adapterkit import AdapterModel
    from adapterkit.serve import create_app

    os.environ["HF_TOKEN"] = token  # the server reads the registry with it (hot-adds pull from there)
    admin = secrets.token_hex(16)
    app = create_app(AdapterModel.from_pretrained(source, domains=[first]), admin_token=admin)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")

    def ask(client: httpx.Client, domain: str) -> httpx.Response:
        image = {"image": ("x.png", png.getvalue(), "image/png")}
        return client.post("/v1/predict", files=image, data={"domain": domain})

    statuses, stop = [], threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(ask(client, first).status_code)

    with httpx.Client(base_url=url, timeout=60) as client:
        answer = ask(client, first).json()["predictions"][0]
        print(f"[5] serving {first} at {url}: POST /v1/predict -> {answer['label']} ({answer['score']:.2f})")
        asker = threading.Thread(target=keep_asking)
        asker.start()
        wait_for(lambda: len(statuses) >= 3)  # the client is busy before the change
        start = time.perf_counter()
        added = client.post(
            "/v1/domains",
            json={"source": source, "domain": second},
            headers={"Authorization": f"Bearer {admin}"},
        )
        took = time.perf_counter() - start
        during = len(statuses)
        wait_for(lambda: len(statuses) >= during + 3)  # and after it
        stop.set()
        asker.join()
        answer = ask(client, second).json()["predictions"][0]
    server.should_exit = True
    print(
        f"    POST /v1/domains hot-added {second} in {took:.2f} s while {len(statuses)} requests were "
        f"answered ({statuses.count(200)} with 200); {second}: {answer['label']} ({answer['score']:.2f})"
    )
    assert added.status_code == 201 and statuses and set(statuses) == {200}


if __name__ == "__main__":
    main()
