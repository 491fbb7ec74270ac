"""`adapterkit-registry gc` collects the Xet store beside a live server: a deleted repo's file records,
xorbs, shard records and plain blobs are reclaimed; referenced ones survive and download bit-identically;
a just-uploaded unreferenced file survives its grace period. Files are uploaded by the real client and
hf_xet over real HTTP; ages are set with `os.utime`, never waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.blobs import read_json
from huggingface_hub import HfApi, hf_hub_download

TOKEN = "xet-gc-test-token-0123"
MONTH = 30 * 24 * 3600


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapterkit_registry", *args], capture_output=True, text=True, timeout=300
    )


def data(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(300_000)


def xet_file(root: Path, repo: str) -> tuple[str, str, set[str]]:
    """(Xet hash, SHA-256, xorbs) of the one file uploaded to `repo`, from its LFS record."""
    (marker,) = (root / "repos" / "models" / repo / "lfs").iterdir()
    xet = read_json(marker)["xet"]
    record = read_json(root / "xet" / "files" / xet[:2] / f"{xet}.json")
    return xet, marker.name, {seg[0] for seg in record["segments"]}


def present(root: Path, xet: str, sha: str, xorbs: set[str]) -> list[bool]:
    x = root / "xet"
    return [
        (x / "files" / xet[:2] / f"{xet}.json").is_file(),
        (x / "sha256" / sha[:2] / f"{sha}.json").is_file(),
        all((x / "xorbs" / h[:2] / h).is_file() for h in xorbs),
        any((x / "xorbs" / h[:2] / h).is_file() for h in xorbs),
        (root / "objects" / sha[:2] / sha).is_file(),
    ]


def age_everything(root: Path, seconds: float) -> None:
    then = time.time() - seconds
    for folder in (root / "xet", root / "objects"):
        for dirpath, _, names in os.walk(folder):
            for name in names:
                os.utime(Path(dirpath) / name, (then, then))


def test_gc_reclaims_a_deleted_repos_xet_data_and_keeps_the_rest(tmp_path):
    root = tmp_path / "root"
    with RegistryServer(root, tokens={TOKEN: ("alice", "write")}, lfs_threshold_mb=0.05) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        files = {}
        for seed, name in enumerate(("keep", "gone", "young")):
            repo = api.create_repo(f"alice/{name}").repo_id
            api.upload_file(path_or_fileobj=data(seed), path_in_repo=f"{name}.bin", repo_id=repo)
            files[name] = xet_file(root, repo)
            if name == "gone":
                api.delete_repo(repo)
                age_everything(root, MONTH)  # keep's and gone's objects are old; young's are uploaded next
        api.delete_repo("alice/young")  # unreferenced, but within the grace periods
        assert not files["keep"][2] & files["gone"][2]
        shards_before = len(list((root / "xet" / "shards").glob("*/*.json")))

        dry = cli("gc", "--root", str(root), "--dry-run")
        assert "xet: would remove 1 file record(s)" in dry.stdout, dry.stdout + dry.stderr
        assert all(present(root, *files["gone"]))
        r = cli("gc", "--root", str(root))  # beside the live server
        assert r.returncode == 0 and "xet: removed 1 file record(s)" in r.stdout, r.stdout + r.stderr

        assert present(root, *files["gone"]) == [False] * 5  # record, index, xorbs, plain blob
        assert all(present(root, *files["keep"])) and all(present(root, *files["young"]))
        assert len(list((root / "xet" / "shards").glob("*/*.json"))) == shards_before - 1
        assert fsck(Storage(root, create=False)) == []
        got = hf_hub_download(
            "alice/keep", "keep.bin", endpoint=srv.url, token=TOKEN, cache_dir=tmp_path / "c"
        )
        assert Path(got).read_bytes() == data(0)  # through Xet: reconstruction from the kept xorbs
        plain = httpx2.get(
            f"{srv.url}/alice/keep/resolve/main/keep.bin", headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert plain.status_code == 200 and plain.content == data(0)
        again = cli("gc", "--root", str(root), "--grace-s", "0", "--xorb-grace-s", "0")
        assert "xet: removed 1 file record(s)" in again.stdout  # young's, once its grace is waived
        assert present(root, *files["young"]) == [False] * 5 and all(present(root, *files["keep"]))
        got = hf_hub_download(
            "alice/keep", "keep.bin", endpoint=srv.url, token=TOKEN, cache_dir=tmp_path / "c2"
        )
        assert Path(got).read_bytes() == data(0)


def test_gc_and_backup_exclude_each_other(tmp_path):
    from adapterkit_registry.flock import maintenance_lock

    root = tmp_path / "root"
    with RegistryServer(root):
        with maintenance_lock(root, "backup"):
            r = cli("gc", "--root", str(root))
            b = cli("backup", "--root", str(root), str(tmp_path / "b"))
    for out in (r, b):
        assert out.returncode == 2 and "another backup, gc or repo move is running" in out.stderr, out.stderr
    assert not (tmp_path / "b").exists()


def test_a_shard_naming_a_xorb_collected_after_its_check_is_refused(tmp_path):
    """The interleaving gc's lock closes: the shard's files are checked, then a gc removes their xorb,
    then the shard would be recorded. It is refused with XorbMissing and nothing is registered."""
    from adapterkit_registry.xet_format import XetError
    from adapterkit_registry.xet_shard import build_shard
    from adapterkit_registry.xet_store import XetStore
    from xet_support import CHUNKS, shard_file, xorb_parts

    class CollectedMeanwhile(XetStore):
        def _check_file(self, f, plain):  # noqa: ANN001, ANN202
            record = super()._check_file(f, plain)
            for xorb, *_ in record["segments"]:
                self._path("xorbs", xorb).unlink()  # what a gc does between the check and the record
            return record

    store = CollectedMeanwhile(tmp_path / "xet")
    name, data, cas = xorb_parts(CHUNKS)
    store.put_xorb(name, data)
    entry = shard_file(name, CHUNKS, 0, 4)
    with pytest.raises(XetError) as e:
        store.put_shard(build_shard([entry], [cas]))
    assert e.value.code == "XorbMissing"
    assert not list((tmp_path / "xet" / "files").glob("*/*.json")) and not store.pending()
