"""Reliability suite: concurrent writers, SIGKILL during a burst of commits, hostile metadata present.

Bounded and loopback only. The figures these scenarios give at a larger scale are measured by
`python -m adapterkit_registry.bench` and recorded in docs/registry.md (no timing thresholds here).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import httpx2
from adapterkit_registry import RegistryServer, Storage, create_token, fsck
from registry_support import _legacy_root, _serve

TOKEN = "reliability-token-012345"
WRITERS, COMMITS = 4, 20


def _commit(url: str, token: str, repo_id: str, path: str, data: bytes, timeout: float = 60) -> str:
    lines = [
        {"key": "header", "value": {"summary": path}},
        {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode()}},
    ]
    r = httpx2.post(
        f"{url}/api/models/{repo_id}/commit/main",
        content=b"".join(json.dumps(x).encode() + b"\n" for x in lines),
        headers={"authorization": f"Bearer {token}", "content-type": "application/x-ndjson"},
        timeout=timeout,
    )
    r.raise_for_status()
    return r.json()["commitOid"]


def _reread(url: str, repo_id: str, acked: list[tuple[str, str, bytes]]) -> list[str]:
    """Problems with acknowledged commits: each one resolvable and its file byte-identical."""
    problems = []
    with httpx2.Client(base_url=url, timeout=60) as client:
        for oid, path, data in acked:
            r = client.get(f"/{repo_id}/resolve/{oid}/{path}")
            if r.status_code != 200 or r.content != data or r.headers["x-repo-commit"] != oid:
                problems.append(f"{oid} {path}: {r.status_code}")
    return problems


def _writers(url: str, token: str, repo_id: str, n: int, m: int, stop: threading.Event | None = None):
    acked: list[tuple[str, str, bytes]] = []
    lock = threading.Lock()

    def run(w: int) -> None:
        for i in range(m):
            if stop is not None and stop.is_set():
                return
            path, data = f"w{w}/c{i}.bin", os.urandom(64) + b"%d-%d" % (w, i)
            try:
                oid = _commit(url, token, repo_id, path, data, timeout=10)
            except (httpx2.HTTPError, OSError):
                if stop is None:
                    raise
                return
            with lock:
                acked.append((oid, path, data))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    return threads, acked


def test_concurrent_writers_lose_nothing(tmp_path):
    with RegistryServer(tmp_path / "root", tokens={TOKEN: ("alice", "write")}) as srv:
        httpx2.post(
            f"{srv.url}/api/repos/create", json={"name": "busy"}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        threads, acked = _writers(srv.url, TOKEN, "alice/busy", WRITERS, COMMITS)
        for t in threads:
            t.join()
        assert len(acked) == WRITERS * COMMITS and len({a[0] for a in acked}) == len(acked)
        assert _reread(srv.url, "alice/busy", acked) == []
        listed = httpx2.get(f"{srv.url}/api/models/alice/busy/tree/main/w0").json()
        assert len(listed) == COMMITS
        history = {c["id"] for c in _all_commits(srv.url, "alice/busy")}
        assert {a[0] for a in acked} <= history
    assert fsck(Storage(srv.root, create=False)) == []


def _all_commits(url: str, repo_id: str) -> list[dict]:
    out, next_url = [], f"{url}/api/models/{repo_id}/commits/main"
    while next_url:
        r = httpx2.get(next_url)
        out += r.json()
        next_url = r.links.get("next", {}).get("url")
    return out


def test_sigkill_during_a_burst_of_commits_loses_nothing(tmp_path):
    root, log = tmp_path / "root", tmp_path / "server.log"
    token = create_token(root, "alice")
    proc, url = _serve(root, log)
    try:
        httpx2.post(
            f"{url}/api/repos/create", json={"name": "burst"}, headers={"authorization": f"Bearer {token}"}
        )
        stop = threading.Event()
        threads, acked = _writers(url, token, "alice/burst", WRITERS, 1000, stop)
        deadline = time.monotonic() + 120
        while len(acked) < 30:
            assert time.monotonic() < deadline, "the writers made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # in the middle of the burst: commits are in flight
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
        survivors = list(acked)
        assert fsck(Storage(root, create=False)) == []  # even before the restart's recovery
        proc, url = _serve(root, log)
        assert _reread(url, "alice/burst", survivors) == []
        assert fsck(Storage(root, create=False)) == []
        _commit(url, token, "alice/burst", "after.txt", b"after the restart")
    finally:
        proc.kill()
        proc.wait()


def test_listing_stays_healthy_with_a_hostile_readme_from_an_old_root(tmp_path):
    """A billion-laughs README stored before metadata was parsed at commit time costs one entry."""
    root = tmp_path / "root"
    _legacy_root(root)
    laughs = "---\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    commit_dir = root / "repos/models/alice/old/commits"
    refs = json.loads((root / "repos/models/alice/old/refs.json").read_text())
    head = json.loads((commit_dir / f"{refs['branches']['main']}.json").read_text())
    readme_sha = head["tree"]["README.md"]["sha256"]
    blob = root / "objects" / readme_sha[:2] / readme_sha
    blob.write_text(
        laughs + "---\n"
    )  # same name, hostile content (fsck would flag it; listing must not care)
    head["tree"]["README.md"]["size"] = blob.stat().st_size
    (commit_dir / f"{head['id']}.json").write_text(json.dumps(head))
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}) as srv:
        httpx2.post(
            f"{srv.url}/api/repos/create", json={"name": "fine"}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        for _ in range(3):
            listing = httpx2.get(f"{srv.url}/api/models?full=true&cardData=true", timeout=30)
            assert listing.status_code == 200
            entries = {m["id"]: m for m in listing.json()}
            assert entries["alice/old"]["tags"] == [] and "alice/fine" in entries
            assert httpx2.get(f"{srv.url}/", timeout=30).status_code == 200
            assert httpx2.get(f"{srv.url}/api/models/alice/old", timeout=30).status_code == 200
