"""Push and pull families on the Hugging Face Hub, or on any server speaking its API (our registry:
set `HF_ENDPOINT`). Files only: pushing a folder and pulling never build the backbone.

A push reads the remote family at its current commit, refuses other backbone weights and a basis that
does not extend the remote one, then commits the pushed domains' files (and the basis, the family JSON
and the model card) against that commit: a concurrent push gets a clear conflict. A domain's files are
only ever added or replaced, so no push or pull can drop another domain.

A push that changes nothing makes no commit and answers the repo's current commit, as huggingface_hub's
own `create_commit`, `upload_folder` and `ModelHubMixin.push_to_hub` do (they log "No files have been
modified since last commit"): `push_folder`'s `PushResult.changed` says which, and `push_to_hub`, which
returns the URL only, logs it once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import backbone_tag, domain_tag, model_card
from .family import check_compatible, check_pull, family_basis, record_pulled
from .format import (
    BASIS_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    atomic_write,
    domain_entry_file,
    domain_file,
    json_bytes,
    read_config,
    sha256,
)
from .sources import (
    Source,
    endpoint,
    hub_source,
    is_connection_error,
    local_source,
    token_refused,
    unreachable,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import ModelInfo

    from .model import AdapterModel

logger = logging.getLogger(__name__)


@dataclass
class PushResult:
    """What a push did: the full repo id (with the namespace the Hub chose), the commit, the domains."""

    repo_id: str
    commit_url: str
    domains: list[str]
    changed: bool = True  # False: the repo already held these files as they are (no new commit)


def family_json(config: dict[str, Any]) -> bytes:
    """`adapterkit.json` in the current format from a config read in any format."""
    return json_bytes(
        {k: v for k, v in config.items() if k != "domains"} | {"format_version": FORMAT_VERSION}
    )


def _hub_error(error: Exception, repo_id: str) -> Exception:
    """A clear error for what the Hub answered (auth, conflicts, Xet), or the error itself."""
    from huggingface_hub.errors import HfHubHTTPError

    text = str(error)
    if "xet-write-token" in text and ("404" in text or "501" in text):  # hf_xet's error: a server without Xet
        return RuntimeError(
            f"{endpoint()} does not speak Xet: upgrade the server (adapterkit-registry speaks it), "
            "or set HF_HUB_DISABLE_XET=1 to upload through the LFS batch API, and retry"
        )
    if is_connection_error(error):
        return unreachable(error)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if not isinstance(error, HfHubHTTPError) or status is None:
        return error
    if status == 412:
        return RuntimeError(f"{repo_id} changed while pushing (someone else committed); pull and push again")
    if status == 401:
        return token_refused(error)
    if status == 403:
        return PermissionError(
            f"{endpoint()} refused to write {repo_id}: the token is read-only or the namespace is not yours. "
            "Use a write token for that namespace, or push to your own (e.g. yourname/family)"
        )
    return error


class _EmptyCommitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No files have been modified since last commit" not in record.getMessage()


@contextmanager
def _without_empty_commit_notice() -> Iterator[None]:
    """huggingface_hub's warning, logged twice, when a commit changes nothing: a push reports that itself."""
    loggers = [logging.getLogger(f"huggingface_hub.{n}") for n in ("hf_api", "_upload_pipeline")]
    notice = _EmptyCommitNotice()
    for log in loggers:
        log.addFilter(notice)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(notice)


def _remote(api: HfApi, repo_id: str, branch: str | None) -> tuple[dict | None, Source]:
    source = hub_source(repo_id, revision=branch, token=api.token)
    if CONFIG_FILE not in source.files:
        return None, source
    return read_config(source.fetch, source.files), source


def _commit(
    local: dict[str, Any],
    local_basis: Callable[[], dict],
    files: dict[str, bytes],
    repo_id: str,
    *,
    private: bool | None,
    branch: str | None,
    message: str,
    token: str | None,
    force: bool,
) -> PushResult:
    """Check against the remote family, add what keeps its other domains whole, and commit once.
    `local_basis` is called only when the remote family has a basis (it needs torch)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private and not api.model_info(repo_id).private:  # create_repo keeps an existing repo's visibility
            raise PermissionError(
                f"{repo_id} exists and is public, and private=True (--private) applies only when a repo is "
                f"created; nothing was pushed. Make it private first (HfApi().update_repo_settings("
                f"{repo_id!r}, private=True)) or push to a new repo"
            )
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote, source = _remote(api, repo_id, branch)
        table = dict(local["domains"])
        if remote is not None:
            check_compatible(local, remote, repo_id, force)
            if remote.get("basis") and not force:
                from .basis import check_extends

                pushed = f"the pushed basis (against {repo_id})"
                check_extends(family_basis(source, remote), local_basis(), pushed)
            for name, entry in remote["domains"].items():
                table.setdefault(name, entry)
                if remote["format_version"] == 1 and domain_entry_file(name) not in files:
                    files[domain_entry_file(name)] = json_bytes(
                        entry | {"name": name}
                    )  # keep version-1 domains
        files["README.md"] = model_card(local | {"domains": dict(sorted(table.items()))}, repo_id).encode()
        operations = [CommitOperationAdd(path, data) for path, data in files.items()]
        with _without_empty_commit_notice():  # (PushResult.changed says it, once)
            info = api.create_commit(
                repo_id, operations, commit_message=message, revision=branch, parent_commit=source.revision
            )  # (the Hub skips a commit that changes nothing and answers the last one)
    except Exception as e:
        error = _hub_error(e, repo_id)
        if error is e:
            raise
        raise error from e
    return PushResult(repo_id, info.commit_url, sorted(local["domains"]), changed=info.oid != source.revision)


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
    """Publish domains of `model` (default: all) to a Hub repo; other domains there stay as they are.

    Args:
        private: create the repo private (only when it does not exist yet).
        branch: push to this branch (created from the default branch when missing).
        force: push even if the remote family was built on other backbone weights or another basis.

    Returns:
        the commit URL; when the repo already held these files, no commit is made and this is the URL of
        its current commit (huggingface_hub's own push methods answer the same), logged as a warning.
    """
    from .family import family_files

    names = model.domains if domains is None else list(domains)
    _check_something_to_push(names, "the model")
    files = family_files(model, names)
    local = json.loads(files[CONFIG_FILE]) | {
        "domains": {n: json.loads(files[domain_entry_file(n)]) for n in names}
    }
    message = commit_message or f"adapterkit: push {', '.join(names)}"
    result = _commit(
        local,
        model.basis,
        files,
        repo_id,
        private=private,
        branch=branch,
        message=message,
        token=token,
        force=force,
    )
    if not result.changed:
        logger.warning(
            "%s already holds these files: no new commit (its current one: %s)",
            result.repo_id,
            result.commit_url,
        )
    return result.commit_url


def _check_something_to_push(names: list[str], what: str) -> None:
    """Refuse a push of no domain: it would publish (or re-commit) a family without the domains asked for."""
    if not names:
        raise ValueError(
            f"no domain to push: {what} has none, or domains=[] selected none; train or load one first, "
            "or name the domains to push"
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    domains: list[str] | None = None,
    private: bool | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    force: bool = False,
) -> PushResult:
    """Publish a family folder's domains (default: all) without building the backbone."""
    source = local_source(Path(folder))
    if CONFIG_FILE not in source.files:
        raise FileNotFoundError(f"{folder} is not an adapterkit family folder (no {CONFIG_FILE})")
    config = read_config(source.fetch, source.files, domains, where=str(folder))
    names = list(config["domains"])
    _check_something_to_push(names, str(folder))
    files = {}
    for name in names:
        files[domain_file(name)] = source.fetch(domain_file(name)).read_bytes()
        files[domain_entry_file(name)] = json_bytes(config["domains"][name] | {"name": name})
    if config.get("basis"):
        files[BASIS_FILE] = source.fetch(BASIS_FILE).read_bytes()
    files[CONFIG_FILE] = family_json(config)
    message = commit_message or f"adapterkit: push {', '.join(names)}"
    return _commit(
        config,
        lambda: family_basis(source, config) if config.get("basis") else {},
        files,
        repo_id,
        private=private,
        branch=branch,
        message=message,
        token=token,
        force=force,
    )


def pull_family(
    repo_id: str,
    folder: str | Path,
    *,
    domains: list[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Download domains (default: all) of a Hub family into a folder, merging with what it holds.

    Domains already in the folder stay; a folder holding a family on other backbone weights, or a basis
    that neither extends nor is extended by the remote one, is refused before anything is written. A
    pulled domain replaces the folder's one of the same name when that is the version an earlier pull
    wrote; one trained, resumed or edited there since is kept (the pull refused) unless `overwrite`.

    Returns:
        the pulled domain names.
    """
    source = hub_source(repo_id, revision=revision, token=token)
    remote = read_config(source.fetch, source.files, domains, where=repo_id)
    names = list(remote["domains"])
    out = Path(folder)
    here = local_source(out) if (out / CONFIG_FILE).is_file() else None
    local = read_config(here.fetch, here.files) if here else None
    keep_local_basis = False
    if local is not None:
        check_compatible(remote, local, str(out), force)
        if local.get("basis") and remote.get("basis"):
            from .basis import check_extends

            ours, theirs = family_basis(here, local), family_basis(source, remote)
            keep_local_basis = any(ours[n].shape[1] > theirs.get(n, ours[n][:, :0]).shape[1] for n in ours)
            if keep_local_basis:
                check_extends(theirs, ours, f"the basis of {repo_id} (against {out})")
            else:
                check_extends(ours, theirs, f"the basis of {repo_id} (against {out})")
        keep_local_basis = keep_local_basis or (bool(local.get("basis")) and not remote.get("basis"))
        check_pull(out, source, remote, names, overwrite)
    written = {}
    for name in names:
        data = source.fetch(domain_file(name)).read_bytes()
        atomic_write(out / domain_file(name), data)
        atomic_write(out / domain_entry_file(name), json_bytes(remote["domains"][name] | {"name": name}))
        written[name] = sha256(data)
    record_pulled(out, written)
    config = local if keep_local_basis else remote
    if remote.get("basis") and not keep_local_basis:
        atomic_write(out / BASIS_FILE, source.fetch(BASIS_FILE).read_bytes())
    table = (local or {}).get("domains", {}) | {n: remote["domains"][n] for n in names}
    card = model_card(config | {"domains": dict(sorted(table.items()))}, repo_id)
    atomic_write(out / "README.md", card.encode())
    atomic_write(out / CONFIG_FILE, family_json(config))
    return names


def list_families(
    backbone: str | None = None,
    *,
    domain: str | None = None,
    author: str | None = None,
    search: str | None = None,
    token: str | bool | None = None,
) -> list[ModelInfo]:
    """adapterkit families on the Hub (or our registry), optionally for one backbone or domain.

    Uses only `HfApi.list_models` tag filters (`adapterkit`, `backbone:<timm name>`, `domain:<name>`), so
    it works the same on the public Hub and on a self-hosted registry.
    """
    from huggingface_hub import HfApi

    tags = ["adapterkit"]
    if backbone:
        tags.append(backbone_tag(backbone))
    if domain:
        tags.append(domain_tag(domain))
    try:
        return list(HfApi(token=token).list_models(filter=tags, author=author, search=search, cardData=True))
    except Exception as e:
        if is_connection_error(e):
            raise unreachable(e) from e
        raise


def list_domains(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, **kwargs: Any
) -> dict:
    """The domain table of a family (names, classes, metrics, sizes), reading only JSON files."""
    source = hub_source(repo_id, revision=revision, token=token, **kwargs)
    return read_config(source.fetch, source.files)["domains"]
