"""Branch and tag edits: one `refs.json` rewrite under the repo lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .blobs import atomic_write_json
from .errors import HubError, bad_request, revision_not_found
from .validation import check_new_ref, check_ref_name

if TYPE_CHECKING:
    from .storage import RepoKey, Storage


def set_branch(storage: Storage, key: RepoKey, name: str, revision: str | None, create: bool) -> str:
    """Create (`create=True`, from `revision` or main's head) or delete (`create=False`) a branch."""
    if create:
        check_new_ref(name, "branch")
    else:  # an existing ref made before the naming rules may still be deleted
        check_ref_name(name, "branch name")
    with storage.lock(key):
        refs = storage.refs(key)
        if not create:
            if name not in refs["branches"]:
                raise revision_not_found(name)
            if name == "main":
                raise bad_request("The main branch cannot be deleted.")
            del refs["branches"][name]
            target = ""
        else:
            if name in refs["branches"] or name in refs["tags"]:
                raise HubError(409, "RefExists", f"A branch or tag named {name!r} already exists.")
            target = storage.resolve(key, revision).commit if revision else refs["branches"]["main"]
            refs["branches"][name] = target
        atomic_write_json(storage.repo_dir(key) / "refs.json", refs, storage.tmp)
    return target


def set_tag(
    storage: Storage, key: RepoKey, name: str, revision: str | None, message: str | None, create: bool
) -> None:
    """Create a tag on `revision` (`create=True`) or delete it."""
    if create:
        check_new_ref(name, "tag")
    else:  # an existing ref made before the naming rules may still be deleted
        check_ref_name(name, "tag name")
    with storage.lock(key):
        refs = storage.refs(key)
        if not create:
            if name not in refs["tags"]:
                raise revision_not_found(name)
            del refs["tags"][name]
        else:
            if name in refs["tags"] or name in refs["branches"]:
                raise HubError(409, "RefExists", f"A tag or branch named {name!r} already exists.")
            target = storage.resolve(key, revision or "main").commit
            refs["tags"][name] = {"target": target, "message": message or ""}
        atomic_write_json(storage.repo_dir(key) / "refs.json", refs, storage.tmp)
