"""Where a family is read from: a local folder, or a Hub / registry repo pinned to one commit.

A `Source` lists the family's files and maps each path to a local file (`fetch`), so the readers in
`format.py` and `load.py` work the same on both. A Hub source asks for the repo once (its commit and
file list), then downloads single files from that commit only: a push in between never mixes two
versions of a family, and a subset of domains downloads only theirs. Imports no torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import CONFIG_FILE, Fetch

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """A family's files: `label` for messages, `files` (paths inside the family), `fetch(path)`."""

    label: str
    files: list[str]
    fetch: Fetch
    revision: str | None = None  # the commit a Hub source is pinned to


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_connection_error(error: BaseException) -> bool:
    """True for a network failure of the HTTP client (whichever client huggingface_hub uses)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "ConnectError", "Timeout", "TimeoutException"})


def late_endpoint() -> str:
    """A note when HF_ENDPOINT was set after huggingface_hub was imported: it reads the variable once, at
    import, and keeps the endpoint it read (`from adapterkit import AdapterModel` imports it)."""
    from huggingface_hub import constants

    wanted = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    if not wanted or wanted == constants.ENDPOINT.rstrip("/"):
        return ""
    return (
        f"; HF_ENDPOINT is {wanted} now, but huggingface_hub read it when it was imported and uses "
        f"{constants.ENDPOINT}: set HF_ENDPOINT before importing adapterkit (or export it in the shell)"
    )


def unreachable(error: BaseException) -> ConnectionError:
    return ConnectionError(
        f"cannot reach {endpoint()} ({error}): is the Hub or registry running? Point HF_ENDPOINT at your "
        "registry (export HF_ENDPOINT=http://127.0.0.1:PORT) before starting Python, or use a local folder"
        + late_endpoint()
    )


def token_refused(error: Exception) -> PermissionError:
    """What a 401 means: the token sent (token=, HF_TOKEN or a stored login) is missing, unknown, revoked or
    expired; the server's own reason is kept."""
    lines = (getattr(error, "server_message", None) or "").strip().splitlines()
    reason = lines[-1].strip() if lines else ""  # (huggingface_hub may repeat the server's message)
    return PermissionError(
        f"{endpoint()} refused the token{f' ({reason})' if reason else ''}: pass a valid one as token= or "
        "HF_TOKEN (`hf auth login` stores one); an unknown, revoked or expired token is refused even for public repos"
    )


def local_source(directory: Path) -> Source:
    directory = Path(directory)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())

    def fetch(path: str) -> Path:
        full = directory / path
        if not full.is_file():
            if path == CONFIG_FILE:
                raise FileNotFoundError(f"{full} does not exist; is {directory} an adapterkit family folder?")
            raise FileNotFoundError(
                f"{full} does not exist, but {directory}/{CONFIG_FILE} records it: the family folder is "
                "incomplete; copy the file back from where the family came from, or pull the family again"
            )
        return full

    return Source(str(directory), files, fetch)


def hub_source(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    cache_fallback: bool = True,
) -> Source:
    """A Hub repo at one commit. Offline (`local_files_only`, HF_HUB_OFFLINE=1), the cached snapshot is
    used; so it is, with a warning, when the server cannot be reached, unless `cache_fallback=False` (a
    service must serve what its source holds now, or not start)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id}@{revision or 'main'}"
    local_files_only = local_files_only or constants.HF_HUB_OFFLINE
    options = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        if local_files_only:
            sha, files = _cached(repo_id, revision, options)
        else:
            sha, files, label = _ask_hub(repo_id, revision, token, options, cache_fallback, label)
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"repo {repo_id!r} not found on {endpoint()} (or it is private: pass a token with access)"
            + late_endpoint()
        ) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"revision {revision!r} does not exist in {repo_id}") from e
    except EntryNotFoundError as e:  # offline and not cached
        raise FileNotFoundError(f"{label} is not in the local cache; download it once online") from e
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 401:
            raise token_refused(e) from e
        raise

    return Source(label, files, _hub_fetch(repo_id, sha, files, options, force_download), revision=sha)


def _ask_hub(
    repo_id: str,
    revision: str | None,
    token: str | bool | None,
    options: dict[str, Any],
    cache_fallback: bool,
    label: str,
) -> tuple[str, list[str], str]:
    """The commit `revision` names on the server and its files, and the source's label; when the server
    cannot be reached, the cached snapshot's (`options` then stays offline for later downloads)."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=False)
    except Exception as e:
        if not is_connection_error(e):
            raise
        if not cache_fallback:
            raise ConnectionError(
                f"{unreachable(e)}; HF_HUB_OFFLINE=1 uses the copy in the local cache"
            ) from e
        return _cache_fallback(repo_id, revision, options, label, e)
    else:
        sha, files = info.sha, sorted(s.rfilename for s in info.siblings or [])
        if CONFIG_FILE in files:  # by branch name once, so the cache knows the branch offline
            hf_hub_download(repo_id, CONFIG_FILE, revision=revision, **options)
        return sha, files, label


def _cache_fallback(
    repo_id: str, revision: str | None, options: dict[str, Any], label: str, error: Exception
) -> tuple[str, list[str], str]:
    """The cached snapshot, with a warning, when `error` says the server cannot be reached."""
    from huggingface_hub.errors import EntryNotFoundError

    options["local_files_only"] = True  # unreachable: what the cache holds, as hf_hub_download does
    try:
        sha, files = _cached(repo_id, revision, options)
    except EntryNotFoundError:
        raise unreachable(error) from error
    label = f"the cached copy of {label} ({endpoint()} cannot be reached)"
    logger.warning(
        "cannot reach %s: using %s's cached snapshot %s, with only the files downloaded before "
        "(%d); start the registry or check HF_ENDPOINT for the whole family%s",
        endpoint(),
        repo_id,
        sha[:12],
        len(files),
        late_endpoint(),
    )
    return sha, files, label


def _hub_fetch(
    repo_id: str, sha: str, files: list[str], options: dict[str, Any], force_download: bool
) -> Fetch:
    """`fetch` for a Hub source: one file of commit `sha`, downloaded (or found in the cache)."""
    from huggingface_hub import hf_hub_download

    def fetch(path: str) -> Path:
        if path not in files:
            hint = "it is not an adapterkit family" if path == CONFIG_FILE else "the family is incomplete"
            raise FileNotFoundError(f"{repo_id}@{sha} has no {path}: {hint}")
        try:
            return Path(
                hf_hub_download(repo_id, path, revision=sha, force_download=force_download, **options)
            )
        except Exception as e:
            if is_connection_error(e):
                raise unreachable(e) from e
            raise

    return fetch


def _cached(repo_id: str, revision: str | None, options: dict[str, Any]) -> tuple[str, list[str]]:
    """The commit and files of the snapshot the local cache holds (only files downloaded before)."""
    from huggingface_hub import hf_hub_download

    snapshot = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision, **options)).parent
    return snapshot.name, sorted(
        p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
    )


def open_source(source: str | Path, **hub_kwargs: Any) -> Source:
    """A local family folder, or a Hub repo id (`hub_kwargs`: revision, token, cache_dir, ...,
    cache_fallback; see `hub_source`)."""
    if Path(source).is_dir():
        if hub_kwargs.get("revision"):
            raise ValueError(f"revision= applies to Hub repos; {source} is a local folder")
        return local_source(Path(source))
    check_repo_id(source)
    return hub_source(str(source), **hub_kwargs)


def split_source(source: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); a local folder (even with an `@`) stays whole."""
    if "@" not in source or Path(source).exists():
        return source, None
    repo, _, revision = source.rpartition("@")
    return repo, revision or None


def pin_source(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo or folder, revision) from `org/name@rev` and/or `revision`; ValueError when they disagree."""
    repo, at = split_source(source)
    if at is not None and revision is not None and at != revision:
        raise ValueError(f"{source} and revision={revision!r} disagree; give the revision once")
    return repo, revision or at


def check_repo_id(source: str | Path) -> None:
    """Raise FileNotFoundError for a source that is not a folder and cannot be a family's repo id
    (org/name): a mistyped folder, rather than a Hub lookup that fails on something else."""
    text = str(source)
    if Path(source).is_file():
        raise NotADirectoryError(f"{source} is a file; a family is a folder: pass {Path(source).parent}")
    org, _, name = text.partition("/")
    not_an_id = not org or not name or "/" in name  # `fam/`, `runs/2024/fam`: folder paths, not org/name
    if not_an_id or (text.startswith((".", "/")) and not Path(source).exists()):
        where = "" if Path(source).is_absolute() else f" in {Path.cwd()}"
        raise FileNotFoundError(
            f"{source}: no such folder{where}; give a family folder, or a Hub repo id as org/name"
        )
