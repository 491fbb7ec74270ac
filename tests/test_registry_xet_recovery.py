"""What a killed `gc`, or an older version of the registry, leaves in the Xet store is recovered.

A gc moves a candidate xorb to `xet/tmp/gc-<xorb>-<random>` before deciding about it; killed there, it
leaves that file behind. The tests make exactly that on-disk state (the same rename the gc does, with
the xorb's time as the gc saw it), then check that the next server start, gc, `fsck --repair` or backup
puts it back, and that files are downloaded bit-identically by the real client over HTTP. Chunk
indexes and SHA-256 index entries an older version lost are rebuilt by `fsck --repair`.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from adapterkit_registry import RegistryServer, Storage, fsck
from adapterkit_registry.blobs import read_json
from adapterkit_registry.flock import XET_APPLY_LOCK, file_lock
from adapterkit_registry.xet_format import XetError
from adapterkit_registry.xet_store import XetStore
from huggingface_hub import HfApi, hf_hub_download
from xet_support import cli, data

TOKEN = "xet-recovery-test-token-0123"
MONTH = 30 * 24 * 3600


def serve(root: Path) -> RegistryServer:
    return RegistryServer(root, tokens={TOKEN: ("alice", "write")}, lfs_threshold_mb=0.05)


def upload(root: Path, *seeds: int) -> dict[int, tuple[str, str, list[str]]]:
    """Upload `data(seed)` to `alice/r<seed>` through Xet; `{seed: (xet hash, sha256, xorbs)}`."""
    out = {}
    with serve(root) as srv:
        api = HfApi(endpoint=srv.url, token=TOKEN)
        for seed in seeds:
            repo = api.create_repo(f"alice/r{seed}").repo_id
            api.upload_file(path_or_fileobj=data(seed), path_in_repo="w.bin", repo_id=repo)
            (marker,) = (root / "repos" / "models" / repo / "lfs").iterdir()
            xet = read_json(marker)["xet"]
            record = read_json(root / "xet" / "files" / xet[:2] / f"{xet}.json")
            out[seed] = (xet, marker.name, list(dict.fromkeys(seg[0] for seg in record["segments"])))
    return out


def download(root: Path, tmp_path: Path, seed: int) -> bytes:
    """`w.bin` of `alice/r<seed>`, downloaded by the real client from a server started on `root`."""
    with serve(root) as srv:
        got = hf_hub_download(
            f"alice/r{seed}", "w.bin", endpoint=srv.url, token=TOKEN, cache_dir=tmp_path / uuid.uuid4().hex
        )
        return Path(got).read_bytes()


def xorb_path(root: Path, xorb: str) -> Path:
    return root / "xet" / "xorbs" / xorb[:2] / xorb


def set_aside(root: Path, xorb: str, age_s: float, drop_index: bool = False) -> Path:
    """The state a gc killed after moving `xorb` aside leaves: the same rename, the xorb's time as the
    gc saw it (`age_s` ago); `drop_index`: killed after removing the chunk index, before the bytes."""
    src = xorb_path(root, xorb)
    then = time.time() - age_s
    os.utime(src, (then, then))
    aside = root / "xet" / "tmp" / f"gc-{xorb}-{uuid.uuid4().hex[:8]}"
    src.rename(aside)
    if drop_index:
        src.with_name(xorb + ".json").unlink()
    return aside


def aside_left(root: Path) -> list[Path]:
    return list((root / "xet" / "tmp").glob("gc-*"))


def test_a_running_server_puts_back_an_aside_xorb_a_download_asks_for(tmp_path):
    """A gc killed while the server runs (no restart since): the next download of that xorb puts it
    back instead of answering `XorbMissing` until the next start."""
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    with serve(root) as srv:
        for xorb in xorbs:
            set_aside(root, xorb, MONTH)
        got = hf_hub_download("alice/r0", "w.bin", endpoint=srv.url, token=TOKEN, cache_dir=tmp_path / "c")
        assert Path(got).read_bytes() == data(0)
    assert not aside_left(root) and all(xorb_path(root, x).is_file() for x in xorbs)
    assert fsck(Storage(root, create=False)) == []


def test_a_download_does_not_take_a_xorb_a_running_gc_is_deciding_about(tmp_path):
    """While a gc holds the apply lock its aside xorb stays aside: the read path never waits for the lock
    nor undoes the gc's decision."""
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    store = XetStore(root / "xet")
    aside = set_aside(root, xorbs[0], MONTH)
    with file_lock(root / "xet" / XET_APPLY_LOCK):  # the gc's hold, from another open of the lock file
        with pytest.raises(XetError, match="XorbMissing|is not stored"):
            store.xorb_path(xorbs[0])
        assert aside.exists()
    assert store.xorb_path(xorbs[0]) == xorb_path(root, xorbs[0]) and not aside.exists()


@pytest.mark.parametrize("age_s", [0, MONTH], ids=["refreshed-by-a-dedupe-answer", "old"])
def test_a_xorb_a_killed_gc_left_aside_is_put_back_at_the_next_start(tmp_path, age_s):
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    times = {xorb: set_aside(root, xorb, age_s).stat().st_mtime for xorb in xorbs}
    assert download(root, tmp_path, 0) == data(0)  # the start put it back before clearing tmp/
    assert not aside_left(root) and fsck(Storage(root, create=False)) == []
    assert {x: xorb_path(root, x).stat().st_mtime for x in xorbs} == times  # the next gc decides again


def test_an_aside_copy_of_a_xorb_stored_again_is_removed_not_renamed_over(tmp_path):
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    stored = xorb_path(root, xorbs[0])
    inode = stored.stat().st_ino
    aside = root / "xet" / "tmp" / f"gc-{xorbs[0]}-0123abcd"
    aside.write_bytes(b"not the xorb: renaming it over the stored one would damage it")
    XetStore(root / "xet")  # the store opens (as at server start)
    assert not aside.exists() and stored.stat().st_ino == inode
    assert download(root, tmp_path, 0) == data(0)
    assert fsck(Storage(root, create=False)) == []


def test_gc_puts_back_what_a_killed_gc_left_aside_and_rebuilds_its_chunk_index(tmp_path):
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    set_aside(root, xorbs[0], MONTH, drop_index=True)  # killed between removing the index and the bytes
    r = cli("gc", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not aside_left(root) and xorb_path(root, xorbs[0]).with_name(xorbs[0] + ".json").is_file()
    assert fsck(Storage(root, create=False)) == []  # referenced: this gc kept it
    assert download(root, tmp_path, 0) == data(0)


def test_fsck_reports_an_aside_xorb_and_repair_puts_it_back(tmp_path):
    root = tmp_path / "root"
    ((xet, _, xorbs),) = upload(root, 0).values()
    set_aside(root, xorbs[0], MONTH)
    r = cli("fsck", "--root", str(root))
    assert r.returncode == 1 and aside_left(root), r.stdout + r.stderr  # plain fsck changes nothing
    assert f"xet xorb {xorbs[0]}: left aside in tmp/ by an interrupted gc" in r.stdout
    assert (
        f"xet file {xet}: xorb {xorbs[0]} is missing; `adapterkit-registry fsck --repair` puts it back"
        in r.stdout
    )
    r = cli("fsck", "--root", str(root), "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"repaired: xet: put back xorb {xorbs[0]}, left aside by an interrupted gc" in r.stdout
    assert r.stdout.splitlines()[-1] == "ok" or "\nok\n" in r.stdout
    assert not aside_left(root) and download(root, tmp_path, 0) == data(0)


def test_backup_of_a_root_with_an_aside_xorb_is_complete(tmp_path):
    root = tmp_path / "root"
    ((_, _, xorbs),) = upload(root, 0).values()
    set_aside(root, xorbs[0], MONTH)
    r = cli("backup", "--root", str(root), str(tmp_path / "copy"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert download(tmp_path / "copy", tmp_path, 0) == data(0)


def test_fsck_repair_rebuilds_lost_xet_index_records_and_reports_what_it_cannot(tmp_path):
    root = tmp_path / "root"
    files = upload(root, 0, 1, 2, 3)
    (_, _, (x0, *_)), (_, _, (x1, *_)), (xet2, _, (x2, *_)), (xet3, sha3, _) = files.values()
    assert len({x0, x1, x2}) == 3
    index0, index1 = (xorb_path(root, x).with_name(x + ".json") for x in (x0, x1))
    good1 = index1.read_bytes()
    index0.unlink()  # bytes left without their chunk index (an older version wrote the bytes first)
    index1.write_text('{"hashes": [], "ends": [], "sizes": []}')  # an index that disagrees
    (root / "xet" / "sha256" / sha3[:2] / f"{sha3}.json").unlink()
    xorb_path(root, x2).unlink()  # lost bytes: nothing to rebuild them from
    before = fsck(Storage(root, create=False))
    assert sum("`adapterkit-registry fsck --repair` rebuilds it" in p for p in before) == 4, before

    r = cli("fsck", "--root", str(root), "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    for line in (
        f"repaired: xet: rebuilt the chunk index of xorb {x0} from its bytes",
        f"repaired: xet: rebuilt the chunk index of xorb {x1} from its bytes",
        f"repaired: xet: rebuilt the sha256 index entry of file {xet3}",
        f"xet: xet file {xet2}: xorb {x2} is missing; re-upload the file",
    ):
        assert line in r.stdout, r.stdout
    assert index1.read_bytes() == good1
    assert fsck(Storage(root, create=False)) == [
        f"xet: xet file {xet2}: xorb {x2} is missing; re-upload the file"
    ]
    assert [download(root, tmp_path, seed) for seed in (0, 1, 3)] == [data(seed) for seed in (0, 1, 3)]
    again = cli("fsck", "--root", str(root), "--repair")
    assert "repaired:" not in again.stdout  # nothing left that it can rebuild
