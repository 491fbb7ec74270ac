"""Metadata derived from a revision's files: README.md front matter (tags, library_name, cardData)
and the adapterkit family description (`adapterkit.json`: backbone, domains and their metrics).

Tags follow the public Hub: card `tags`, the `library_name`, `base_model:<id>` for each base model,
`license:<id>` and `dataset:<id>`, so `list_models(filter=[...])` behaves the same way.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import yaml

logger = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
MAX_METADATA_BYTES = 1024 * 1024
"""README.md and adapterkit.json larger than this are not parsed for metadata."""


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML front matter of a model card, or None when there is none.

    Raises:
        ValueError: If the block is not valid YAML or not a mapping.
    """
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    data = yaml.safe_load(match.group(2))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("The YAML front matter of README.md must be a mapping (key: value lines).")
    return data


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def card_metadata(readme: bytes | None) -> dict[str, Any]:
    """`cardData`, `tags`, `library_name` and `pipeline_tag` derived from README.md content.

    A malformed card yields empty metadata instead of an error: listing must never fail on one repo.
    """
    out: dict[str, Any] = {"cardData": None, "tags": [], "library_name": None, "pipeline_tag": None}
    if not readme or len(readme) > MAX_METADATA_BYTES:
        return out
    try:
        card = parse_front_matter(readme.decode("utf-8"))
        card = json.loads(json.dumps(card, default=str))  # YAML dates etc. become strings
    except (ValueError, UnicodeDecodeError, yaml.YAMLError, TypeError) as e:
        logger.debug("ignoring malformed model card: %s", e)
        return out
    if card is None:
        return out
    tags = _as_list(card.get("tags"))
    library = card.get("library_name")
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


def family_summary(data: bytes | None) -> dict[str, Any] | None:
    """Backbone and domains of an `adapterkit.json`, or None if the repo is not an adapterkit family.

    Returns:
        `{"backbone": str | None, "domains": [{"name", "num_classes", "metrics": {name: value}}]}`.
    """
    if not data or len(data) > MAX_METADATA_BYTES:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("domains"), dict):
        return None
    backbone = doc.get("backbone")
    name = (
        backbone.get("name")
        if isinstance(backbone, dict)
        else backbone
        if isinstance(backbone, str)
        else None
    )
    domains = []
    for dname, spec in doc["domains"].items():
        spec = spec if isinstance(spec, dict) else {}
        metrics = spec.get("metrics") if isinstance(spec.get("metrics"), dict) else {}
        num_classes = spec.get("num_classes")
        domains.append(
            {
                "name": str(dname),
                "num_classes": num_classes if isinstance(num_classes, int) else None,
                "metrics": {str(k): v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            }
        )
    return {"backbone": str(name) if name is not None else None, "domains": domains}
