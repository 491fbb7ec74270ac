"""Metadata derived from a revision's files: README.md front matter (tags, library_name, cardData)
and the adapterkit family description (`adapterkit.json`: backbone, domains and their metrics).

Tags follow the public Hub: card `tags`, the `library_name`, `base_model:<id>` for each base model,
`license:<id>` and `dataset:<id>`, so `list_models(filter=[...])` behaves the same way.

User metadata is hostile input. It is parsed once, when a commit is made, by a YAML loader that
refuses aliases (no "billion laughs" expansion), nesting deeper than `MAX_DEPTH` and more than
`MAX_NODES` nodes, and the result is made JSON-safe (no lone surrogates, no NaN, string keys) so that
serving it can never fail. The parsed result is stored with the commit; listings only read it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import yaml

logger = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
MAX_METADATA_BYTES = 1024 * 1024
"""README.md and adapterkit.json larger than this are not parsed for metadata."""
MAX_FRONT_MATTER_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000
EMPTY_CARD: dict[str, Any] = {"cardData": None, "tags": [], "library_name": None, "pipeline_tag": None}


class _LimitedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases and with bounded depth and node count."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ValueError(
                f"YAML aliases (*name) are not allowed in model card metadata (line {mark.line + 1})."
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise ValueError(f"The YAML metadata has more than {MAX_NODES} nodes; keep it smaller.")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ValueError(f"The YAML metadata is nested deeper than {MAX_DEPTH} levels.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of parsed metadata that any JSON encoder accepts (raises ValueError if nested too deep)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"The metadata is nested deeper than {MAX_DEPTH} levels.")
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become '?'
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v, depth + 1) for v in value]
    return json_safe(str(value))  # dates, binary, ...


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML front matter of a model card (JSON-safe), or None when there is none.

    Raises:
        ValueError: If the block is too large, not valid YAML, uses aliases, is nested too deep or
            is not a mapping.
    """
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    block = match.group(2)
    if len(block.encode("utf-8", "replace")) > MAX_FRONT_MATTER_BYTES:
        raise ValueError(f"The YAML front matter is larger than {MAX_FRONT_MATTER_BYTES // 1024} KiB.")
    loader = _LimitedLoader(block)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"Invalid YAML: {e}") from None
    except RecursionError:
        raise ValueError(f"The YAML metadata is nested deeper than {MAX_DEPTH} levels.") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("The YAML front matter of README.md must be a mapping (key: value lines).")
    return json_safe(data)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value if v is not None and not isinstance(v, (dict, list))]
    return [] if isinstance(value, dict) else [str(value)]


def card_from_readme(readme: bytes) -> dict[str, Any]:
    """`cardData`, `tags`, `library_name` and `pipeline_tag` of README.md content.

    Raises:
        ValueError: If the front matter is invalid (see `parse_front_matter`) or not UTF-8.
    """
    try:
        text = readme.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("README.md is not valid UTF-8.") from None
    card = parse_front_matter(text)
    if card is None:
        return dict(EMPTY_CARD)
    tags = _as_list(card.get("tags"))
    library = card.get("library_name")
    out: dict[str, Any] = dict(EMPTY_CARD)
    if isinstance(library, str):
        tags.append(library)
        out["library_name"] = library
    tags += [f"base_model:{b}" for b in _as_list(card.get("base_model"))]
    tags += [f"license:{x}" for x in _as_list(card.get("license"))]
    tags += [f"dataset:{x}" for x in _as_list(card.get("datasets"))]
    if isinstance(card.get("pipeline_tag"), str):
        out["pipeline_tag"] = card["pipeline_tag"]
    out["tags"] = list(dict.fromkeys(tags))
    out["cardData"] = card
    return out


def card_metadata(readme: bytes | None) -> dict[str, Any]:
    """Like `card_from_readme`, but a missing, oversized or malformed card yields empty metadata."""
    if not readme or len(readme) > MAX_METADATA_BYTES:
        return dict(EMPTY_CARD)
    try:
        return card_from_readme(readme)
    except ValueError as e:
        logger.debug("ignoring malformed model card: %s", e)
        return dict(EMPTY_CARD)


def family_summary(data: bytes | None) -> dict[str, Any] | None:
    """Backbone and domains of an `adapterkit.json`, or None if the repo is not an adapterkit family.

    Format 1 lists its domains there; format 2 keeps each domain's entry in `domains/<name>.json`
    (`domain_summary`), so its `domains` start empty and `version` is 2.

    Returns:
        `{"backbone": str | None, "version": int, "domains": [{"name", "num_classes", "metrics"}]}`.
    """
    doc = _json_object(data)
    if doc is None:
        return None
    version = 2 if doc.get("format_version") in (2, 3, 4) else 1  # 3 and 4: version 2's layout
    if version == 1 and not isinstance(doc.get("domains"), dict):
        return None
    backbone = doc.get("backbone")
    name = backbone.get("name") if isinstance(backbone, dict) else backbone
    domains = [_domain(str(d), spec) for d, spec in doc["domains"].items()] if version == 1 else []
    summary = {"backbone": str(name) if isinstance(name, (str, int, float)) else None, "version": version}
    return json_safe(summary | {"domains": domains})


def domain_summary(name: str, data: bytes | None) -> dict[str, Any] | None:
    """One domain of a format-2 family from its `domains/<name>.json`, or None if it is not one."""
    doc = _json_object(data)
    return None if doc is None or doc.get("name") != name else json_safe(_domain(name, doc))


def _json_object(data: bytes | None) -> dict | None:
    if not data or len(data) > MAX_METADATA_BYTES:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _domain(name: str, spec: object) -> dict[str, Any]:
    spec = spec if isinstance(spec, dict) else {}
    metrics = spec.get("metrics") if isinstance(spec.get("metrics"), dict) else {}
    num_classes = spec.get("num_classes")
    return {
        "name": name,
        "num_classes": num_classes if isinstance(num_classes, int) else None,
        "metrics": {str(k): v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }
