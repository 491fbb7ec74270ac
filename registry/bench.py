"""Reliability and scale figures of the registry (recorded in docs/registry.md).

Run: `python -m adapterkit_registry.bench --out figures.json [--depths 10 1000 10000]`. Everything runs
on loopback in a temporary folder; nothing here has a pass/fail threshold (the tests check
correctness; this measures).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2

from . import RegistryServer, Storage, create_token, fsck
from .storage import RepoKey, file_entry

TOKEN = "bench-token-0123456789abc"
LAUGHS = "---\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def _ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "median_ms": round(1000 * statistics.median(values), 2),
        "p95_ms": round(1000 * values[int(0.95 * (len(values) - 1))], 2),
    }


def _bytes_under(*folders: Path) -> int:
    return sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def history(root: Path, depths: list[int], sample: int = 20) -> list[dict[str, Any]]:
    """Commit latency, commit data and fsck time as the history grows (one new file per commit)."""
    storage = Storage(root)
    key = RepoKey("model", "bench", "history")
    storage.create_repo(key, "bench", private=False)
    out, made = [], 0

    def one(i: int) -> float:
        info = storage.blobs.put_bytes(b"file %d" % i)
        entry = file_entry(info.sha256, info.sha1, info.size, False)
        t = time.perf_counter()
        storage.commit(key, "main", [("add", f"d{i % 50}/s{i % 7}/f{i}.txt", entry)], "bench", f"c{i}", "")
        return time.perf_counter() - t

    for depth in depths:
        while made < depth:
            one(made)
            made += 1
        times = [one(made + j) for j in range(sample)]
        made += sample
        t = time.perf_counter()
        problems = fsck(Storage(root, create=False))
        fsck_s = time.perf_counter() - t
        repo = storage.repo_dir(key)
        row = {
            "commits": made,
            **_ms(times),
            "commit_data_mb": round(
                _bytes_under(repo / "commits", repo / "trees", repo / "refs.json") / 2**20, 2
            ),
            "fsck_s": round(fsck_s, 2),
            "fsck_problems": len(problems),
        }
        out.append(row)
        print("history", row, flush=True)
    return out


_READ_EVERY_REVISION = """
import json, sys, time
from adapterkit_registry import Storage
def hwm():  # peak RSS of this process (ru_maxrss would include the parent's, kept across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
from adapterkit_registry.storage import RepoKey
storage = Storage(sys.argv[1], create=False)
key = RepoKey("model", "bench", "history")
ids = sorted(storage.known_commits(key))
base = hwm()
t = time.perf_counter()
n = sum(len(storage.files(key, cid)) for cid in ids)
peak = hwm()
print(json.dumps({"revisions": len(ids), "file_entries_read": n, "seconds": round(time.perf_counter() - t, 1),
                  "rss_before_mb": round(base / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}))
"""


def read_every_revision(root: Path) -> dict[str, Any]:
    """Peak memory of a fresh process reading each revision's file table in turn (what `model_info`
    per revision does), against its memory before reading."""
    out = subprocess.run(
        [sys.executable, "-c", _READ_EVERY_REVISION, str(root)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit(client: httpx2.Client, repo_id: str, path: str, data: bytes) -> str:
    lines = [
        {"key": "header", "value": {"summary": path}},
        {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode()}},
    ]
    r = client.post(
        f"/api/models/{repo_id}/commit/main",
        content=b"".join(json.dumps(x).encode() + b"\n" for x in lines),
        headers={"content-type": "application/x-ndjson"},
    )
    r.raise_for_status()
    return r.json()["commitOid"]


def _writers(url: str, token: str, repo_id: str, n: int, m: int, stop: threading.Event | None = None):
    acked: list[tuple[str, str, bytes]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(w: int) -> None:
        with httpx2.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30) as c:
            for i in range(m):
                if stop is not None and stop.is_set():
                    return
                path, data = f"w{w}/c{i}.bin", os.urandom(32) + b"%d-%d" % (w, i)
                try:
                    oid = _commit(c, repo_id, path, data)
                except (httpx2.HTTPError, OSError) as e:
                    if stop is None:
                        errors.append(repr(e))
                    return
                with lock:
                    acked.append((oid, path, data))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    return threads, acked, errors


def _lost(url: str, repo_id: str, acked: list[tuple[str, str, bytes]]) -> int:
    lost = 0
    with httpx2.Client(base_url=url, timeout=60) as c:
        for oid, path, data in acked:
            r = c.get(f"/{repo_id}/resolve/{oid}/{path}")
            lost += r.status_code != 200 or r.content != data
    return lost


def concurrent_writers(root: Path, n: int = 8, m: int = 100) -> dict[str, Any]:
    """N writers x M commits into one repo; every acknowledged file re-read."""
    with RegistryServer(root, tokens={TOKEN: ("bench", "write")}) as srv:
        httpx2.post(
            f"{srv.url}/api/repos/create", json={"name": "busy"}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        t = time.perf_counter()
        threads, acked, errors = _writers(srv.url, TOKEN, "bench/busy", n, m)
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        lost = _lost(srv.url, "bench/busy", acked)
    return {
        "writers": n,
        "commits_each": m,
        "acknowledged": len(acked),
        "errors": len(errors),
        "lost_or_corrupted": lost,
        "commits_per_s": round(len(acked) / wall, 1),
        "fsck_problems": len(fsck(Storage(root, create=False))),
    }


def _serve(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adapterkit_registry", "serve", "--root", str(root), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx2.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx2.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"the registry did not start; see {log}")


def sigkill_bursts(root: Path, rounds: int = 5, writers: int = 4) -> dict[str, Any]:
    """SIGKILL the server in the middle of bursts of commits; count acknowledged commits lost."""
    token = create_token(root, "bench")
    log = root.parent / "server.log"
    all_acked: list[tuple[str, str, bytes]] = []
    for r in range(rounds):
        proc, url = _serve(root, log)
        if r == 0:
            httpx2.post(
                f"{url}/api/repos/create",
                json={"name": "burst"},
                headers={"authorization": f"Bearer {token}"},
            )
        stop = threading.Event()
        threads, acked, _ = _writers(url, token, "bench/burst", writers, 10_000, stop)
        target = 10 + 7 * r
        while len(acked) < target:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for th in threads:
            th.join()
        all_acked += acked
    proc, url = _serve(root, log)
    try:
        lost = _lost(url, "bench/burst", all_acked)
    finally:
        proc.kill()
        proc.wait()
    return {
        "kills": rounds,
        "acknowledged": len(all_acked),
        "lost_or_corrupted": lost,
        "fsck_problems": len(fsck(Storage(root, create=False))),
    }


def listing_with_hostile_readme(root: Path, repos: int = 200, requests: int = 20) -> dict[str, Any]:
    """`list_models(full=True)` latency with many repos, one holding a billion-laughs README.

    The README is written into the blob store directly, as a root written before metadata was parsed
    at commit time could hold it; the HTTP API now refuses it.
    """
    storage = Storage(root)
    for i in range(repos):
        storage.create_repo(RepoKey("model", "bench", f"r{i}"), "bench", private=False)
    key = RepoKey("model", "bench", "hostile")
    storage.create_repo(key, "bench", private=False)
    info = storage.blobs.put_bytes((LAUGHS + "---\n").encode())
    entry = file_entry(info.sha256, info.sha1, info.size, False)
    storage.commit(key, "main", [("add", "README.md.txt", entry)], "bench", "c", "")
    head = storage.refs(key)["branches"]["main"]
    commit_path = storage.repo_dir(key) / "commits" / f"{head}.json"
    doc = json.loads(commit_path.read_text())
    doc.pop("meta")  # as a first-format commit: metadata computed when read, from the hostile file
    tree = storage.trees(key)
    doc["tree"] = {"README.md": tree.lookup(doc["tree"], "README.md.txt")}
    commit_path.write_text(json.dumps(doc))
    with RegistryServer(root) as srv, httpx2.Client(base_url=srv.url, timeout=60) as c:
        times, health = [], []
        for _ in range(requests):
            t = time.perf_counter()
            r = c.get("/api/models?full=true&cardData=true")
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            c.get("/healthz")
            health.append(time.perf_counter() - t)
    return {"repos": repos + 1, "list_models": _ms(times), "healthz": _ms(health)}


_TOKEN_WORKER = """
import json, sys
from adapterkit_registry.auth import TokenStore
store, n, out = TokenStore(sys.argv[1]), int(sys.argv[2]), []
for i in range(n):
    token = store.create("w" + sys.argv[3], "read")
    if i % 2:
        store.revoke(store.authenticate(token).token_id)
    out.append([token, not i % 2])
print(json.dumps(out))
"""


def tokens(root: Path, processes: int = 6, each: int = 50) -> dict[str, Any]:
    """Token create/revoke from several processes while the server serves; every token checked."""
    with RegistryServer(root) as srv:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _TOKEN_WORKER, str(root), str(each), str(i)], stdout=subprocess.PIPE
            )
            for i in range(processes)
        ]
        outcomes = [tuple(x) for p in procs for x in json.loads(p.communicate()[0])]
        with httpx2.Client(base_url=srv.url, timeout=30) as c:
            status = [
                c.get("/api/whoami-v2", headers={"authorization": f"Bearer {t}"}).status_code
                for t, _ in outcomes
            ]
    pairs = list(zip(outcomes, status, strict=True))
    return {
        "created": len(outcomes),
        "revoked": sum(not live for _, live in outcomes),
        "created_but_not_working": sum(live and s != 200 for (_, live), s in pairs),
        "revoked_but_working": sum(not live and s != 401 for (_, live), s in pairs),
    }


def inline_memory(root: Path, size_mb: int = 9) -> dict[str, Any]:
    """Peak server memory growth for one commit holding a file inline (base64 in the NDJSON)."""
    tok = create_token(root, "bench")
    proc, url = _serve(root, root.parent / "mem.log")
    try:

        def hwm() -> int:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
            return 0

        with httpx2.Client(base_url=url, headers={"authorization": f"Bearer {tok}"}, timeout=120) as c:
            c.post("/api/repos/create", json={"name": "mem"})
            _commit(c, "bench/mem", "warm.bin", b"x")
            before = hwm()
            _commit(c, "bench/mem", "big.bin", os.urandom(size_mb << 20))
            after = hwm()
    finally:
        proc.kill()
        proc.wait()
    return {"file_mb": size_mb, "peak_rss_growth_mb": round((after - before) / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapterkit_registry.bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    p.add_argument("--depths", type=int, nargs="+", default=[10, 1000, 10000])
    p.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    args = p.parse_args(argv)
    scenarios = {
        "history": lambda d: {
            "steps": history(d / "h", args.depths),
            "read_every_revision": read_every_revision(d / "h"),
        },
        "concurrent_writers": lambda d: concurrent_writers(d / "w"),
        "sigkill_bursts": lambda d: sigkill_bursts(d / "k" / "root"),
        "listing_with_hostile_readme": lambda d: listing_with_hostile_readme(d / "l"),
        "inline_memory": lambda d: inline_memory(d / "m" / "root"),
        "tokens": lambda d: tokens(d / "t"),
    }
    figures: dict[str, Any] = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    }
    for name, fn in scenarios.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"registry-bench-{name}-") as d:
            t = time.perf_counter()
            figures[name] = fn(Path(d))
            print(name, json.dumps(figures[name]), f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
