"""`datasets` and the `hf` listing commands against the registry: push_to_hub, load_dataset, repos ls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx2
from huggingface_hub import HfApi

PUSH_AND_LOAD = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset, load_dataset
    repo_id = sys.argv[1]
    rows = {"text": [f"row {i}" for i in range(50)], "label": [i % 3 for i in range(50)]}
    Dataset.from_dict(rows).push_to_hub(repo_id)
    back = load_dataset(repo_id, split="train")
    print(json.dumps({"rows": back.to_dict(), "same": back.to_dict() == rows}))
    """
)


def _env(registry, tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": registry.url,
        "HF_TOKEN": registry.tokens["alice"],
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_DATASETS_CACHE": str(tmp_path / "ds_cache"),
    }
    env.pop("HF_HUB_DISABLE_XET", None)
    return env


def test_push_to_hub_then_load_dataset(registry, tmp_path):
    repo_id = f"alice/ds-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, "-c", PUSH_AND_LOAD, repo_id],
        env=_env(registry, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["same"] is True
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    files = {
        f.path: f
        for f in api.get_paths_info(
            repo_id, api.list_repo_files(repo_id, repo_type="dataset"), repo_type="dataset"
        )
    }
    shards = [p for p in files if p.endswith(".parquet")]
    assert shards and all(files[p].lfs is not None for p in shards)  # parquet goes through LFS, as on the Hub
    assert all(files[p].xet_hash for p in shards)  # ... uploaded through Xet by the default client
    assert "README.md" in files


def test_gitattributes_lfs_patterns_route_preupload(registry):
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    repo_id = api.create_repo(f"alice/ga-{uuid.uuid4().hex[:8]}").repo_id

    def modes(*paths: str) -> list[str]:
        body = {"files": [{"path": p, "size": 10, "sample": ""} for p in paths]}
        r = httpx2.post(
            f"{registry.url}/api/models/{repo_id}/preupload/main",
            json=body,
            headers={"authorization": f"Bearer {registry.tokens['alice']}"},
        )
        return [f["uploadMode"] for f in r.json()["files"]]

    assert modes("a.parquet", "w.safetensors") == ["regular", "regular"]  # models: size only, by default
    rules = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\nkeep/*.safetensors -filter\n"
    api.upload_file(path_or_fileobj=rules, path_in_repo=".gitattributes", repo_id=repo_id)
    assert modes("w.safetensors", "d/w.safetensors", "keep/w.safetensors", "a.txt") == [
        "lfs",
        "lfs",
        "regular",
        "regular",
    ]


def test_hf_repos_ls_and_listing_commands(registry, tmp_path):
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    repo_id = api.create_repo(f"alice/ls-{uuid.uuid4().hex[:8]}").repo_id
    api.upload_file(path_or_fileobj=b"12345", path_in_repo="f.bin", repo_id=repo_id)
    hf = str(Path(sys.executable).with_name("hf"))
    env = _env(registry, tmp_path)
    for args in (
        ["repos", "ls"],
        ["models", "ls", "--author", "alice"],
        ["datasets", "ls"],
        ["models", "info", repo_id],
    ):
        proc = subprocess.run([hf, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
    mine = {r.id: r for r in api.list_user_repos()}
    assert mine[repo_id].storage == 5 and mine[repo_id].visibility == "public"
    assert all(r.startswith("alice/") for r in mine)
