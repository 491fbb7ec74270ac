"""Hostile metadata: one user's README or adapterkit.json must never hurt another user's requests."""

from __future__ import annotations

import base64
import json
import uuid

import httpx2
import pytest
from huggingface_hub import HfApi

LAUGHS = (
    "---\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "tags: [x]\n---\n# hi\n"
)


def _name() -> str:
    return f"alice/h-{uuid.uuid4().hex[:8]}"


def commit_body(files: dict[str, bytes], summary: str = "s") -> bytes:
    """An NDJSON commit adding `files` inline (what the client sends for regular files)."""
    lines = [{"key": "header", "value": {"summary": summary, "description": ""}}]
    for path, data in files.items():
        value = {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}
        lines.append({"key": "file", "value": value})
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def raw_commit(registry, repo_id: str, files: dict[str, bytes], token: str | None = None) -> httpx2.Response:
    """POST a commit without the client's own README validation."""
    headers = {"authorization": f"Bearer {token or registry.tokens['alice']}"}
    url = f"{registry.url}/api/models/{repo_id}/commit/main"
    return httpx2.post(url, content=commit_body(files), headers=headers, timeout=60)


def _listing_is_healthy(registry) -> None:
    anon = HfApi(endpoint=registry.url, token=False)
    assert len(list(anon.list_models(full=True, cardData=True))) >= 1
    assert httpx2.get(registry.url + "/", timeout=60).status_code == 200
    assert httpx2.get(registry.url + "/api/models?full=true&cardData=true", timeout=60).status_code == 200


@pytest.mark.parametrize(
    "readme",
    [
        LAUGHS,
        "---\ntags: " + "[" * 200 + "]" * 200 + "\n---\n",
        "---\n" + "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 60)) + "---\n",
        "---\ntags: [" + ", ".join(["x"] * 30000) + "]\n---\n",
        "---\n- a list\n---\n",
        "---\nkey: [unclosed\n---\n",
    ],
    ids=["billion-laughs", "deep-flow", "deep-block", "too-many-nodes", "not-a-mapping", "bad-yaml"],
)
def test_hostile_readme_is_refused_at_commit(registry, readme):
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    repo_id = api.create_repo(_name()).repo_id
    r = raw_commit(registry, repo_id, {"README.md": readme.encode()})
    assert r.status_code == 400 and r.headers["x-error-code"] == "InvalidMetadata", r.text
    assert "README.md" in r.json()["error"]
    check = httpx2.post(f"{registry.url}/api/validate-yaml", json={"content": readme, "repoType": "model"})
    assert check.status_code == 400 and check.json()["errors"]
    assert api.list_repo_files(repo_id) == []
    _listing_is_healthy(registry)


def test_odd_but_accepted_metadata_never_breaks_listing(registry):
    api = HfApi(endpoint=registry.url, token=registry.tokens["alice"])
    repo_id = api.create_repo(_name()).repo_id
    files = {
        "README.md": b'---\ntags: ["\\ud800", ok]\nvalue: .nan\nwhen: 2024-01-01\n---\n',
        "adapterkit.json": b'{"domains": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }
    r = raw_commit(registry, repo_id, files)
    assert r.status_code == 200, r.text
    info = api.model_info(repo_id)
    assert "ok" in info.tags and info.card_data["value"] == "nan" and info.card_data["when"] == "2024-01-01"
    _listing_is_healthy(registry)
    deep_family = {"adapterkit.json": b'{"domains": {"d": {"metrics": ' + b"[" * 5000 + b"]" * 5000 + b"}}}"}
    assert raw_commit(registry, repo_id, deep_family).status_code == 200
    _listing_is_healthy(registry)
