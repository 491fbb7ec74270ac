"""Validation of repo ids, file paths and revision names (rejects path traversal with a 400)."""

from __future__ import annotations

import re

from .errors import bad_request

REPO_TYPES = {"models": "model", "datasets": "dataset"}
"""API path segment -> repo type."""
URL_PREFIXES = {"model": "", "dataset": "datasets/"}
"""Repo type -> prefix used in git-style URLs (`/datasets/ns/name/resolve/...`)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
RESERVED_NAMESPACES = frozenset(
    {"api", "datasets", "spaces", "models", "kernels", "buckets", "lfs-upload", "healthz"}
)


def check_name(value: str, what: str = "name") -> str:
    """Validate one component of a repo id (namespace or name).

    Args:
        value: The component, already percent-decoded.
        what: What it is, for the error message.

    Returns:
        The value unchanged.

    Raises:
        HubError: 400 `InvalidRepoId` for traversal (`..`), slashes, odd characters or bad length.
    """
    if not _NAME_RE.match(value) or ".." in value or "--" in value or value.endswith(".git"):
        raise bad_request(
            f"Invalid repo {what} {value!r}: use 1-96 characters among letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit, without '--', '..' or a '.git' suffix.",
            "InvalidRepoId",
        )
    return value


def check_repo_id(namespace: str, name: str) -> str:
    """Validate `namespace/name` and return the repo id."""
    check_name(namespace, "namespace")
    check_name(name, "name")
    if namespace.lower() in RESERVED_NAMESPACES:
        raise bad_request(f"Namespace {namespace!r} is reserved; choose another one.", "InvalidRepoId")
    return f"{namespace}/{name}"


def check_path(path: str) -> str:
    """Validate a file path inside a repo.

    Args:
        path: A relative POSIX path such as `domains/cifar.safetensors`.

    Returns:
        The path unchanged.

    Raises:
        HubError: 400 `InvalidPath` for absolute paths, `..`/`.` components, backslashes,
            empty components, control characters, `.git` components or over-long paths.
    """
    parts = path.split("/")
    bad = (
        not path
        or len(path) > 1024
        or path.startswith("/")
        or "\\" in path
        or any(ord(c) < 32 or c == "\x7f" for c in path)
        or not utf8(path)
        or any(p in ("", ".", "..") for p in parts)
        or any(p.lower() == ".git" for p in parts)
    )
    if bad:
        raise bad_request(
            f"Invalid path in repo {path!r}: use a relative POSIX path ('dir/file.ext') of UTF-8 text without "
            "'..', '.', empty components, backslashes, control characters or '.git'.",
            "InvalidPath",
        )
    return path


def check_ref_name(name: str, what: str = "revision") -> str:
    """Validate a branch, tag or revision name (git ref rules, simplified).

    Raises:
        HubError: 400 `InvalidRevision`.
    """
    parts = name.split("/")
    bad = (
        not _REF_RE.match(name)
        or ".." in name
        or name.endswith(("/", ".lock", "."))
        or any(p == "" or p.startswith(".") for p in parts)
    )
    if bad:
        raise bad_request(
            f"Invalid {what} {name!r}: use letters, digits, '.', '_', '-' and '/', without '..', empty "
            "components or a leading '.'.",
            "InvalidRevision",
        )
    return name


def check_new_ref(name: str, kind: str) -> str:
    """Validate the name of a new branch or tag: a valid ref that cannot be mistaken for a commit.

    Raises:
        HubError: 400 `InvalidRevision`.
    """
    check_ref_name(name, f"{kind} name")
    if name.startswith("refs/") or name == "HEAD":
        raise bad_request(
            f"Invalid {kind} name {name!r}: 'HEAD' and names starting with 'refs/' are git's own.",
            "InvalidRevision",
        )
    if is_hex(name.lower(), 7, 40):
        raise bad_request(
            f"Invalid {kind} name {name!r}: 7 to 40 hex digits read as a short commit sha; add a letter "
            "outside a-f or a prefix such as 'v'.",
            "InvalidRevision",
        )
    return name


def utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (JSON's escapes can carry lone surrogates, which do not, and would
    break every later response that includes the text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_hex(value: str, min_len: int, max_len: int) -> bool:
    """Whether `value` is lowercase hex of a length in `[min_len, max_len]`."""
    return min_len <= len(value) <= max_len and bool(_HEX_RE.match(value))
