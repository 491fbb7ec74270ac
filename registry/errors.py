"""Errors that map onto Hub-style HTTP error responses (`X-Error-Code` / `X-Error-Message`).

`huggingface_hub` picks its exception class from the `X-Error-Code` header (`RepoNotFound`,
`RevisionNotFound`, `EntryNotFound`, ...), so every error the registry returns carries one.
"""

from __future__ import annotations


class HubError(Exception):
    """An error answered to the client as `status` with `X-Error-Code: code`.

    Args:
        status: HTTP status code.
        code: Value of the `X-Error-Code` header.
        message: Human-readable explanation; says how to fix the problem where possible.
        headers: Extra response headers (e.g. `X-Repo-Commit` on a missing file).
        header_message: `X-Error-Message` when it must differ from `message` (a fixed string the
            client recognises); `message` then goes in the JSON body only.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        header_message: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.header_message = header_message


def bad_request(message: str, code: str = "BadRequest") -> HubError:
    """400 with a specific error code (`InvalidRepoId`, `InvalidPath`, `InvalidRevision`, ...)."""
    return HubError(400, code, message)


def repo_not_found(repo_id: str) -> HubError:
    """404 `RepoNotFound`; identical for missing and for private-without-access repos (never leak existence)."""
    return HubError(
        404,
        "RepoNotFound",
        f"Repository {repo_id!r} not found. Check the repo id and type; if it is private, "
        "authenticate with a token of its owner (HF_TOKEN or token=...).",
    )


def revision_not_found(revision: str, detail: str = "") -> HubError:
    """404 `RevisionNotFound`."""
    extra = f" {detail}" if detail else ""
    return HubError(
        404,
        "RevisionNotFound",
        f"Invalid rev id: {revision!r} is not a branch, tag or commit of this repository.{extra}",
    )


def entry_not_found(path: str, commit: str | None = None) -> HubError:
    """404 `EntryNotFound`; carries `X-Repo-Commit` so clients can cache the non-existence."""
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubError(404, "EntryNotFound", f"Entry {path!r} not found in this revision.", headers)


def too_large(size: int, limit: int) -> HubError:
    """413 `PayloadTooLarge`."""
    return HubError(
        413,
        "PayloadTooLarge",
        f"Upload of {size} bytes exceeds this registry's limit of {limit} bytes. Split the upload or "
        "ask the operator to raise --max-upload-mb.",
    )


class RegistryError(RuntimeError):
    """A refusal about the registry root or setup (bad root, root in use); the CLI prints it as one line."""
