"""What the registry tests share: a registry started as a real subprocess, and a root in the first
storage format (for the reader that keeps old roots working)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from adapterkit_registry.storage import commit_id, file_entry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `python -m adapterkit_registry serve` and wait until it answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "adapterkit_registry", "serve", "--root", str(root), "--port", str(port)]
    cmd += ["--lfs-threshold-mb", "0.05", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"registry subprocess exited: {log.read_text()}")
        try:
            if httpx2.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx2.TransportError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"registry subprocess did not start: {log.read_text()}")


def _blob(root: Path, data: bytes) -> dict:
    sha256 = hashlib.sha256(data).hexdigest()
    sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    path = root / "objects" / sha256[:2] / sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return file_entry(sha256, sha1, len(data), False)


def _legacy_root(root: Path) -> list[str]:
    """A registry root as the first storage format wrote it: full file tables, ids in refs.json."""
    repo = root / "repos" / "models" / "alice" / "old"
    (repo / "commits").mkdir(parents=True)
    (repo / "lfs").mkdir()
    (root / "registry.json").write_text(json.dumps({"format_version": 1}))
    (repo / "repo.json").write_text(
        json.dumps(
            {
                "id": "alice/old",
                "type": "model",
                "private": False,
                "owner": "alice",
                "createdAt": "2025-01-01T00:00:00.000Z",
            }
        )
    )
    tables = [
        {},
        {"a/x.txt": _blob(root, b"one")},
        {"a/x.txt": _blob(root, b"two"), "README.md": _blob(root, b"---\ntags: [legacy]\n---\n")},
    ]
    ids: list[str] = []
    for i, table in enumerate(tables):
        body = {
            "format_version": 1,
            "parents": ids[-1:],
            "tree": table,
            "author": "alice",
            "title": f"c{i}",
            "message": "",
            "date": f"2025-01-0{i + 1}T00:00:00.000Z",
            "nonce": f"n{i}",
        }
        cid = commit_id(body)
        (repo / "commits" / f"{cid}.json").write_text(json.dumps({**body, "id": cid}))
        ids.append(cid)
    refs = {"branches": {"main": ids[-1]}, "tags": {"v1": {"target": ids[1], "message": ""}}, "commits": ids}
    (repo / "refs.json").write_text(json.dumps(refs))
    return ids
