"""Push and pull families on the Hugging Face Hub, or on any server speaking its API (our registry:
set `HF_ENDPOINT`). Pulling reads one file at a time, so a subset of domains downloads only theirs.

A push reads the remote `adapterkit.json`, merges its domain table with the pushed domains, and
commits only the files that change, against the commit it read (a concurrent push gets a clear
conflict instead of silently dropping a domain). The backbone is never uploaded with the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .card import base_model_id, domain_tag
from .family import BASIS_FILE, CONFIG_FILE, Fetch, family_files
from .load import read_config, read_safetensors

if TYPE_CHECKING:
    from huggingface_hub.hf_api import ModelInfo

    from .model import AdapterModel


def hub_fetch(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Fetch:
    """A fetch function over a Hub repo. The first file pins the commit; later files come from it,
    so a push in between never mixes two versions of a family."""
    pinned: dict[str, str] = {}

    def fetch(path: str) -> Path:
        try:
            local = hf_hub_download(
                repo_id,
                path,
                revision=pinned.get("sha", revision),
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        except EntryNotFoundError as e:
            hint = " it is not an adapterkit family" if path == CONFIG_FILE else " the family is incomplete"
            raise FileNotFoundError(f"{repo_id}@{revision or 'main'} has no {path}:{hint}") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(
                f"repo {repo_id!r} not found on {_endpoint()} (or it is private: pass token=)"
            ) from e
        except RevisionNotFoundError as e:
            raise FileNotFoundError(f"revision {revision!r} does not exist in {repo_id}") from e
        local = Path(local)
        if "sha" not in pinned:
            snapshot = local.parents[len(Path(path).parts) - 1]  # <cache>/snapshots/<commit>/<path>
            if len(snapshot.name) == 40:
                pinned["sha"] = snapshot.name
        return local

    return fetch


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def remote_config(api: HfApi, repo_id: str, revision: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The family config at a revision and that revision's commit, or (None, commit) if there is none."""
    try:
        info = api.model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        return None, None
    if not any(s.rfilename == CONFIG_FILE for s in info.siblings or []):
        return None, info.sha
    fetch = hub_fetch(repo_id, revision=info.sha, token=api.token)
    return read_config(fetch), info.sha


def _check_basis_extends(model: AdapterModel, api: HfApi, repo_id: str, sha: str, force: bool) -> None:
    """The pushed basis must extend the remote one, or old domains on the Hub would change."""
    tensors, _ = read_safetensors(hub_fetch(repo_id, revision=sha, token=api.token)(BASIS_FILE), BASIS_FILE)
    layers = model.layers()
    for key, remote in tensors.items():
        local = getattr(layers.get(key.removesuffix(".beta")), "beta", None)
        if (
            local is None
            or local.shape[1] < remote.shape[1]
            or not torch.equal(local[:, : remote.shape[1]].cpu(), remote)
        ):
            if force:
                return
            raise ValueError(
                f"the model's basis for {key.removesuffix('.beta')} does not extend the one in {repo_id}: it was "
                "re-factorised, which would change the domains already published. Push to a new repo, or pass "
                "force=True and re-push every domain."
            )


def push_to_hub(
    model: AdapterModel,
    repo_id: str,
    *,
    domains: list[str] | None = None,
    private: bool | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    force: bool = False,
) -> str:
    """Publish domains of `model` to a Hub repo; other domains already there are kept untouched.

    Args:
        domains: the domains to push (default: all loaded ones).
        private: create the repo private (only when it does not exist yet).
        branch: push to this branch (created from the default branch when missing).
        force: push even if the remote family was built on other backbone weights or another basis.

    Returns:
        the commit URL.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if branch is not None:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    previous, parent = remote_config(api, repo_id, branch)
    if previous is not None:
        if previous["backbone"]["fingerprint"] != model.fingerprint and not force:
            raise ValueError(
                f"{repo_id} holds a family trained on other backbone weights ({previous['backbone'].get('name')!r}); "
                "push to a new repo, or pass force=True to replace its domain table"
            )
        if previous.get("basis"):
            _check_basis_extends(model, api, repo_id, parent, force)
    names = model.domains if domains is None else list(domains)
    files = family_files(model, names, previous)
    operations = [CommitOperationAdd(path, data) for path, data in files.items()]
    message = commit_message or f"adapterkit: push {', '.join(names)}"
    try:
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=branch, parent_commit=parent
        )
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 412:
            raise RuntimeError(
                f"{repo_id} changed while pushing (someone else committed); pull the new family and push again"
            ) from e
        if "xet-write-token" in str(e):
            raise RuntimeError(f"{_endpoint()} does not speak Xet; set HF_HUB_DISABLE_XET=1 and retry") from e
        raise
    return info.commit_url


def list_families(
    backbone: str | None = None,
    *,
    domain: str | None = None,
    author: str | None = None,
    search: str | None = None,
    token: str | bool | None = None,
) -> list[ModelInfo]:
    """adapterkit families on the Hub (or our registry), optionally for one backbone or domain.

    Uses only `HfApi.list_models` tag filters (`adapterkit`, `base_model:<id>`, `domain:<name>`), so it
    works the same on the public Hub and on a self-hosted registry.
    """
    tags = ["adapterkit"]
    if backbone:
        tags.append(f"base_model:{base_model_id(backbone)}")
    if domain:
        tags.append(domain_tag(domain))
    return list(HfApi(token=token).list_models(filter=tags, author=author, search=search, cardData=True))


def list_domains(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, **kwargs: Any
) -> dict:
    """The domain table of a family (names, classes, metrics, sizes), reading only `adapterkit.json`."""
    return read_config(hub_fetch(repo_id, revision=revision, token=token, **kwargs))["domains"]


def family_info(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> dict:
    """The whole `adapterkit.json` of a family, as JSON."""
    return json.loads(json.dumps(read_config(hub_fetch(repo_id, revision=revision, token=token))))
