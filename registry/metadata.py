"""Metadata of a revision (README card fields, adapterkit family), parsed once per file content.

A commit stores the result (`meta`) when it is made, so listings only read it. Commits written before
that (the first storage format) get it computed here, leniently, and cached by content hash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .blobs import BlobStore
from .cards import MAX_METADATA_BYTES, card_from_readme, card_metadata, domain_summary, family_summary
from .errors import bad_request
from .objects import LRU

Lookup = Callable[[str], "dict[str, Any] | None"]
MAX_DOMAINS = 1000  # domain entries a page or listing summarises per family


class MetadataParser:
    """Parses README.md and adapterkit.json of a revision, cached by blob hash.

    Args:
        blobs: The blob store holding the files.
    """

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs
        self._cache = LRU(4096)

    def _parse(self, kind: str, entry: dict | None, strict: bool) -> Any:
        if entry is None or entry["size"] > MAX_METADATA_BYTES:
            return card_metadata(None) if kind == "card" else None
        key = (kind, entry["sha256"], strict and kind == "card")
        cached = self._cache.get(key)
        if cached is None:
            data = self.blobs.path(entry["sha256"]).read_bytes()
            if kind == "family":
                cached = family_summary(data)
            elif kind.startswith("domain:"):
                cached = domain_summary(kind.removeprefix("domain:"), data)
            else:
                cached = card_from_readme(data) if strict else card_metadata(data)
            self._cache.put(key, cached, 1)
        return cached

    def check_card(self, entry: dict[str, Any]) -> None:
        """Parse a new README.md strictly, before the commit takes the repo lock (the result is cached).

        Raises:
            HubError: 400 `InvalidMetadata`.
        """
        self.derive(lambda p: entry if p == "README.md" else None, strict_card=True)

    def derive(self, lookup: Lookup, strict_card: bool = False) -> dict[str, Any]:
        """Card fields of README.md plus `family` from adapterkit.json.

        Args:
            lookup: Returns the file entry at a path of the revision, or None.
            strict_card: Refuse an invalid README front matter instead of ignoring it.

        Raises:
            HubError: 400 `InvalidMetadata` with `strict_card` when README.md's metadata is invalid.
        """
        try:
            card = self._parse("card", lookup("README.md"), strict_card)
        except ValueError as e:
            raise bad_request(
                f"Invalid metadata in README.md: {e} Fix the YAML front matter between the '---' lines.",
                "InvalidMetadata",
            ) from None
        family = self._parse("family", lookup("adapterkit.json"), False)
        if family is not None and family.get("version") == 2:  # each domain's entry is its own file
            names = [t.removeprefix("domain:") for t in card.get("tags") or [] if t.startswith("domain:")]
            entries = (
                self._parse(f"domain:{n}", lookup(f"domains/{n}.json"), False) for n in names[:MAX_DOMAINS]
            )
            family = {**family, "domains": [e for e in entries if e is not None]}
        return {**card, "family": family}
