"""Xet dedupe on the registry: bytes the server receives when a ~100 MB backbone file is pushed,
re-pushed with one tensor changed, pushed to a second repo, and the changed file to a third (issue 14, item 4).

A ResNet-50 state dict (timm, random init, float32: about 102 MB of safetensors) is the backbone file.
The registry (`adapterkit_registry.RegistryServer`) runs in this process on loopback; every push is a
separate `upload_file` process with the default client install (`hf_xet`), and, unless noted, a fresh
Hub and Xet cache, so whatever it does not send was deduplicated by the server (global dedupe), not
by a local cache. The figure is the bytes of xorb and shard bodies the server received, as a ratio of
the file size; each file is downloaded back and checked bit-identical.

Also timed: the wall time of a first Xet push over a first LFS push (`HF_HUB_DISABLE_XET=1`) of a new
backbone file, alternated, median of the per-repeat ratios.

Run from the repository root (a few minutes):
    PYTHONPATH=. python benchmarks/bench_xet_dedupe.py [--out benchmarks/results/xet_dedupe.json]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import timm
import torch
from _common import write_report
from safetensors.torch import save_file

TOKEN = "bench-xet-dedupe-token"
UPLOAD = """
    import sys
    from huggingface_hub import HfApi
    url, token, path, repo = sys.argv[1:]
    HfApi(endpoint=url, token=token).upload_file(path_or_fileobj=path, path_in_repo="backbone.safetensors", repo_id=repo)
"""


def backbone_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()}


def backbone_files(folder: Path) -> tuple[Path, Path, str]:
    """The backbone file, and a copy with one mid-network tensor changed (same shapes, same header)."""
    state = backbone_state(0)
    save_file(state, folder / "v1.safetensors")
    changed = "layer3.2.conv2.weight"
    state[changed] = state[changed] + 0.01
    save_file(state, folder / "v2.safetensors")
    return folder / "v1.safetensors", folder / "v2.safetensors", changed


def push(url: str, path: Path, repo: str, home: Path, xet: bool = True) -> float:
    """Upload `path` from a separate process; returns its wall time in seconds."""
    script = home.parent / "upload.py"
    script.write_text(textwrap.dedent(UPLOAD))
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_DISABLE_XET", None)
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"  # the classic LFS batch upload
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), url, TOKEN, str(path), repo], env=env, capture_output=True
    )
    if out.returncode:
        raise RuntimeError(out.stdout.decode()[-3000:] + out.stderr.decode()[-3000:])
    return time.perf_counter() - start


def time_first_pushes(srv, api, tmp: Path, repeats: int) -> dict[str, object]:
    """Wall time of a Xet push over an LFS push of new content (a backbone of another seed each time),
    alternating which goes first; the median of the per-repeat ratios."""
    ratios = []
    for r in range(repeats):
        runs = {}
        for xet in (r % 2 == 0, r % 2 == 1):
            path = tmp / f"t{r}{int(xet)}.safetensors"
            save_file(backbone_state(100 + 2 * r + int(xet)), path)
            repo = api.create_repo(f"alice/timing-{r}-{'xet' if xet else 'lfs'}").repo_id
            runs[xet] = push(srv.url, path, repo, tmp / f"hf-t{r}{int(xet)}", xet=xet)
            path.unlink()
        ratios.append(runs[True] / runs[False])
        print(f"repeat {r}: xet {runs[True]:.1f} s, lfs {runs[False]:.1f} s, ratio {ratios[-1]:.2f}")
    return {"xet_over_lfs_push_time": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="alternated Xet/LFS first pushes to time")
    args = parser.parse_args()
    start = time.perf_counter()
    from adapterkit_registry import RegistryServer
    from huggingface_hub import HfApi, hf_hub_download

    tmp = Path(tempfile.mkdtemp(prefix="adapterkit-bench-xet-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # about 2 GB of roots, caches and files
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
        timing = time_first_pushes(srv, api, tmp, args.repeats)
    print(
        f"file {size / 1e6:.1f} MB; store: {stats}; Xet/LFS push time: {timing['xet_over_lfs_push_time']:.2f}"
    )
    if args.out:
        results = {"file_bytes": size, "rows": rows, "store": stats, "timing": timing}
        write_report(args.out, "xet_dedupe", {"repeats": args.repeats}, results, start)


if __name__ == "__main__":
    main()
