"""Xet from separate client processes: `adapterkit push`/`pull` of a family whose domain files exceed
the LFS threshold, global dedupe between two clients that share no cache, and SIGKILL of the server
in the middle of a Xet upload (nothing half-registered, the retried upload succeeds)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from adapterkit_registry import RegistryServer, Storage, create_token, fsck
from adapterkit_registry.storage import RepoKey
from adapterkit_registry.xet_store import XetStore
from huggingface_hub import HfApi, hf_hub_download
from registry_support import _serve

from adapterkit import AdapterModel

ALICE = "alice-xet-push-token-0123"
UPLOAD = """
    import sys
    from huggingface_hub import HfApi
    url, token, path, repo = sys.argv[1:]
    HfApi(endpoint=url, token=token).upload_file(path_or_fileobj=path, path_in_repo="big.bin", repo_id=repo)
"""


@pytest.fixture(scope="module")
def xsrv(tmp_path_factory):
    root = tmp_path_factory.mktemp("xetpush")
    with RegistryServer(root, tokens={ALICE: ("alice", "write")}, lfs_threshold_mb=0.05) as server:
        yield server


def client_env(url: str, home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": ALICE, "HF_HOME": str(home)}
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_DISABLE_XET", None)
    return env


def upload(url: str, token: str, path: Path, repo: str, home: Path) -> subprocess.Popen:
    """Upload `path` as `big.bin` from a separate process with its own Hub and Xet cache."""
    script = home.parent / f"up-{uuid.uuid4().hex[:6]}.py"
    script.write_text(textwrap.dedent(UPLOAD))
    env = {**client_env(url, home), "HF_TOKEN": token}
    cmd = [sys.executable, str(script), url, token, str(path), repo]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_adapterkit_push_and_pull_go_through_xet(xsrv, tmp_path):
    model = AdapterModel.from_backbone("test_resnet")
    for i, name in enumerate(("a", "b")):
        model.add_domain(name, num_classes=2 + i)
    model.save_pretrained(tmp_path / "fam")
    domain_files = sorted((tmp_path / "fam" / "domains").glob("*.safetensors"))
    assert all(p.stat().st_size > 0.05 * 1024 * 1024 for p in domain_files)  # above the threshold
    before = xsrv.app.state.hub.xet_received()
    cli = [str(Path(sys.executable).with_name("adapterkit"))]
    env = client_env(xsrv.url, tmp_path / "hf")
    out = subprocess.run(
        cli + ["push", str(tmp_path / "fam"), "alice/fam"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert xsrv.app.state.hub.xet_received()["xorbs"] > before["xorbs"]
    out = subprocess.run(
        cli + ["pull", "alice/fam", str(tmp_path / "pulled")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for p in domain_files:
        assert (tmp_path / "pulled" / "domains" / p.name).read_bytes() == p.read_bytes()


def test_a_second_client_sends_almost_nothing_for_known_content(xsrv, tmp_path):
    data = np.random.default_rng(11).bytes(3_000_000)
    (tmp_path / "w.bin").write_bytes(data)
    hub = xsrv.app.state.hub
    sent = []
    for i, repo in enumerate(("alice/dedupe-one", "alice/dedupe-two")):
        HfApi(endpoint=xsrv.url, token=ALICE).create_repo(repo)
        before = hub.xet_received()["xorb_bytes"]
        proc = upload(xsrv.url, ALICE, tmp_path / "w.bin", repo, tmp_path / f"hf{i}")  # no shared cache
        assert proc.wait(120) == 0, proc.stdout.read().decode()[-2000:]
        sent.append(hub.xet_received()["xorb_bytes"] - before)
    assert sent[0] >= len(data) * 0.9 and sent[1] <= len(data) * 0.05, sent
    got = hf_hub_download("alice/dedupe-two", "big.bin", endpoint=xsrv.url, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == data


def test_sigkill_during_a_xet_upload_leaves_no_half_registered_file(tmp_path):
    root, log = tmp_path / "root", tmp_path / "server.log"
    token = create_token(root, "alice")
    proc, url = _serve(root, log)
    data = np.random.default_rng(12).bytes(48 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    key = RepoKey("model", "alice", "durable")
    client = None
    try:
        HfApi(endpoint=url, token=token).create_repo("alice/durable")
        client = upload(url, token, tmp_path / "big.bin", "alice/durable", tmp_path / "hf")
        deadline = time.monotonic() + 120
        while not any(
            p.stat().st_size > 0 for p in (root / "tmp").glob("upload-*")
        ):  # the file being written
            assert client.poll() is None and time.monotonic() < deadline, "the upload never reached the shard"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        client.kill()
        client.wait()

        proc, url = _serve(root, log)
        assert list((root / "tmp").iterdir()) == []
        storage = Storage(root)
        assert fsck(storage) == []
        # killed while the store wrote the plain bytes during its SHA-256 pass: before the shard
        # registered the file (on a slow machine, perhaps just after), never half of it
        store = XetStore(root / "xet", read_only=True)
        xf = store.file_by_sha256(sha)
        assert xf is None or hashlib.sha256(b"".join(store.read_file(xf.file_hash))).hexdigest() == sha
        obj = storage.lfs_object(key, sha)  # committable only once its bytes are complete and verified
        assert obj is None or storage.blobs.hash_file(sha).sha256 == sha
        assert "big.bin" not in HfApi(endpoint=url, token=token).list_repo_files("alice/durable")
        client = upload(url, token, tmp_path / "big.bin", "alice/durable", tmp_path / "hf")  # the retry
        assert client.wait(180) == 0, client.stdout.read().decode()[-2000:]
        got = hf_hub_download(
            "alice/durable", "big.bin", endpoint=url, token=token, cache_dir=tmp_path / "dl"
        )
        assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == sha
        assert fsck(Storage(root)) == []
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        proc.kill()
        proc.wait()
