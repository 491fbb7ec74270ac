"""`adapterkit-registry gc` collects the Xet store beside a live server: a deleted repo's file records,
xorbs, shard records and plain blobs are reclaimed; referenced ones survive and download bit-identically;
a just-uploaded unreferenced file survives its grace period. Files are uploaded by the real client and
hf_xet over real HTTP; ages are set with `os.utime`, never waited for."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx2
import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.blobs import read_json
from huggingface_hub import HfApi, hf_hub_download
from xet_support import cli, data

TOKEN = "xet-gc-test-token-0123"
MONTH = 30 * 24 * 3600


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


DAY = 24 * 3600


def unreferenced_file(tmp_path: Path, chunks: list[bytes]):  # noqa: ANN201
    """(storage, store, xorb hash, xorb bytes) of a root whose Xet store holds one file, made of one
    xorb of `chunks`, that no repo references; everything a month old."""
    from adapterkit_registry.xet_shard import build_shard
    from adapterkit_registry.xet_store import XetStore
    from xet_support import shard_file, xorb_parts

    storage = Storage(tmp_path / "root")
    store = XetStore(storage.root / "xet")
    name, blob, cas = xorb_parts(chunks)
    store.put_xorb(name, blob)
    store.put_shard(build_shard([shard_file(name, chunks, 0, len(chunks))], [cas]))
    age_everything(storage.root, MONTH)
    return storage, store, name, blob


def on_unlink(monkeypatch: pytest.MonkeyPatch, target: Path, action) -> list:  # noqa: ANN001
    """Run `action` once, just before `target` is unlinked; returns the list its results go to."""
    results: list = []
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == target and not results:
            results.append(action())
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    return results


@pytest.mark.parametrize("touch", ["dedupe answer", "upload again"])
def test_a_xorb_named_between_the_gc_scan_and_its_removal_stays(tmp_path, monkeypatch, touch):
    """The racy order: gc scans (the xorb is old and unused), a client is told the server holds it (a
    dedupe answer, or `was_inserted: false` for an upload), then gc removes. The xorb stays."""
    from adapterkit_registry.xet_gc import collect_xet
    from xet_support import CHUNKS

    storage, store, xorb, blob = unreferenced_file(tmp_path, CHUNKS[:4])
    xet = storage.root / "xet"
    (record,) = (xet / "files").glob("*/*.json")  # removed after the scan, before the xorbs

    def tell() -> bool:
        if touch == "dedupe answer":
            return any(store.dedupe_shard(p.stem) for p in (xet / "chunks").glob("*/*.json"))
        return store.put_xorb(xorb, blob) is False

    told = on_unlink(monkeypatch, record, tell)
    report = collect_xet(storage, grace_s=DAY, xorb_grace_s=DAY)
    monkeypatch.undo()
    assert told == [True] and report.removed_files == 1
    assert store.has_xorb(xorb) and report.removed_xorbs == 0 and report.kept_recent == 1
    assert store.fsck() == []


def test_an_upload_racing_the_removal_of_its_xorb_keeps_bytes_and_chunk_index_together(tmp_path, monkeypatch):
    """The racy order: gc removes a xorb's bytes, the same xorb is uploaded again, gc removes its
    chunk index. The upload waits for gc's apply lock (here, made non-blocking, it is refused at that
    point), so the bytes are never left without their chunk index."""
    import functools

    from adapterkit_registry import xet_store as xet_store_module
    from adapterkit_registry.errors import RegistryError
    from adapterkit_registry.flock import file_lock
    from adapterkit_registry.xet_gc import collect_xet
    from xet_support import CHUNKS

    storage, store, xorb, blob = unreferenced_file(tmp_path, CHUNKS[4:8])
    index = storage.root / "xet" / "xorbs" / xorb[:2] / f"{xorb}.json"
    monkeypatch.setattr(xet_store_module, "file_lock", functools.partial(file_lock, blocking=False))

    def upload() -> object:
        try:
            return store.put_xorb(xorb, blob)
        except RegistryError:  # gc holds the apply lock: the upload would wait for it
            return "waits"

    uploads = on_unlink(monkeypatch, index, upload)
    collect_xet(storage, grace_s=DAY, xorb_grace_s=DAY)
    monkeypatch.undo()
    assert uploads == ["waits"]
    assert index.is_file() == index.with_name(xorb).is_file()  # both or neither
    assert store.put_xorb(xorb, blob) is True and store.fsck() == []  # the upload, once gc is done


def test_gc_scans_without_the_apply_lock_and_keeps_a_xorb_a_shard_used_meanwhile(tmp_path, monkeypatch):
    """Shards are registered while gc scans; one registered after the scan that uses a xorb the scan
    found unused keeps it (the registration touches its xorbs, and gc re-checks under the lock)."""
    from adapterkit_registry import xet_gc
    from adapterkit_registry.errors import RegistryError
    from adapterkit_registry.flock import XET_APPLY_LOCK, file_lock
    from adapterkit_registry.xet_shard import build_shard
    from xet_support import CHUNKS, shard_file, xorb_parts

    storage, store, old_xorb, _ = unreferenced_file(tmp_path, CHUNKS[8:10])
    xet = storage.root / "xet"
    name, blob, cas = xorb_parts(CHUNKS[10:12])
    store.put_xorb(name, blob)  # no file uses it yet
    age_everything(storage.root, MONTH)
    lock_free, registered = [], []
    real_read, real_lock = xet_gc.read_json, xet_gc.file_lock

    def read_json(path: Path):  # noqa: ANN202
        if path.parent.parent == xet / "files" and not lock_free:  # scanning the file records
            try:
                with file_lock(xet / XET_APPLY_LOCK, blocking=False):
                    lock_free.append(True)
            except RegistryError:
                lock_free.append(False)
        return real_read(path)

    def lock(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not registered:  # after the scan, before the removal
            shard = build_shard([shard_file(name, CHUNKS[10:12], 0, 2)], [cas])
            registered.extend(store.put_shard(shard))
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(xet_gc, "read_json", read_json)
    monkeypatch.setattr(xet_gc, "file_lock", lock)
    report = xet_gc.collect_xet(storage, grace_s=DAY, xorb_grace_s=DAY)
    monkeypatch.undo()
    assert lock_free == [True]  # a shard could be registered during the scan
    assert (report.removed_files, report.xorbs, report.removed_xorbs) == (1, 2, 1)
    assert store.has_xorb(name) and not store.has_xorb(old_xorb)
    assert store.fsck() == []
    assert b"".join(store.read_file(registered[0].file_hash)) == b"".join(CHUNKS[10:12])
