"""Xet dedupe on the registry: bytes the server receives when a ~100 MB backbone file is pushed,
re-pushed with one tensor changed, and pushed to a second repo (issue 14, item 4).

A ResNet-50 state dict (timm, random init, float32: about 102 MB of safetensors) is the backbone file.
The registry (`adapterkit_registry.RegistryServer`) runs in this process on loopback; every push is a
separate `upload_file` process with the default client install (`hf_xet`), and, unless noted, a fresh
Hub and Xet cache, so whatever it does not send was deduplicated by the server (global dedupe), not
by a local cache. The figure is the bytes of xorb and shard bodies the server received, as a ratio of
the file size; each file is downloaded back and checked bit-identical.

Run from the repository root (about a minute):
    PYTHONPATH=. python benchmarks/bench_xet_dedupe.py [--out benchmarks/results/xet_dedupe.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

TOKEN = "bench-xet-dedupe-token"
UPLOAD = """
    import sys
    from huggingface_hub import HfApi
    url, token, path, repo = sys.argv[1:]
    HfApi(endpoint=url, token=token).upload_file(path_or_fileobj=path, path_in_repo="backbone.safetensors", repo_id=repo)
"""


def backbone_files(folder: Path) -> tuple[Path, Path, str]:
    """The backbone file, and a copy with one mid-network tensor changed (same shapes, same header)."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()}
    save_file(state, folder / "v1.safetensors")
    changed = "layer3.2.conv2.weight"
    state[changed] = state[changed] + 0.01
    save_file(state, folder / "v2.safetensors")
    return folder / "v1.safetensors", folder / "v2.safetensors", changed


def push(url: str, path: Path, repo: str, home: Path) -> None:
    script = home.parent / "upload.py"
    script.write_text(textwrap.dedent(UPLOAD))
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_DISABLE_XET", None)
    out = subprocess.run(
        [sys.executable, str(script), url, TOKEN, str(path), repo], env=env, capture_output=True
    )
    if out.returncode:
        raise RuntimeError(out.stdout.decode()[-3000:] + out.stderr.decode()[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    from adapterkit_registry import RegistryServer
    from huggingface_hub import HfApi, hf_hub_download

    tmp = Path(tempfile.mkdtemp(prefix="adapterkit-bench-xet-"))
    v1, v2, changed = backbone_files(tmp)
    size = v1.stat().st_size
    steps = [
        ("first push (repo A)", v1, "alice/family-a"),
        (f"re-push with {changed} changed (repo A)", v2, "alice/family-a"),
        ("same backbone file in a second family (repo B)", v1, "alice/family-b"),
        ("changed file in a third family (repo C)", v2, "alice/family-c"),
    ]
    rows = []
    with RegistryServer(tmp / "root", tokens={TOKEN: ("alice", "write")}) as srv:
        api, hub = HfApi(endpoint=srv.url, token=TOKEN), srv.app.state.hub
        for i, (label, path, repo) in enumerate(steps):
            api.create_repo(repo, exist_ok=True)
            before = hub.xet_received()
            push(srv.url, path, repo, tmp / f"hf-{i}")
            after = hub.xet_received()
            sent = {k: after[k] - before[k] for k in after}
            got = hf_hub_download(
                repo, "backbone.safetensors", endpoint=srv.url, token=TOKEN, cache_dir=tmp / f"dl{i}"
            )
            same = (
                hashlib.sha256(Path(got).read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
            )
            received = sent["xorb_bytes"] + sent["shard_bytes"]
            rows.append(
                {
                    "step": label,
                    "received_bytes": received,
                    "ratio": received / size,
                    **sent,
                    "identical": same,
                }
            )
            print(
                f"{label:55s} received {received / 1e6:8.2f} MB = {received / size:7.4f} x file  identical={same}"
            )
        stats = hub.xet.stats()
    print(f"file {size / 1e6:.1f} MB; store: {stats}")
    if args.out:
        args.out.write_text(json.dumps({"file_bytes": size, "rows": rows, "store": stats}, indent=1))


if __name__ == "__main__":
    main()
