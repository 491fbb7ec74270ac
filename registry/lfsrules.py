"""Which files go through LFS: the Hub's rule, size *or* a `.gitattributes` pattern with `filter=lfs`.

`datasets` relies on it: `push_to_hub` writes each parquet shard to a temporary file, uploads it in
`preupload_lfs_files` and deletes it, so a shard answered `regular` (to be sent later, inline) is gone
by commit time. A repo without `.gitattributes` gets the defaults of its type: parquet and arrow for
datasets, nothing for models (small model files stay inline, which Xet-enabled clients need).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Rule = tuple[re.Pattern[str], bool]
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {"dataset": ("*.parquet", "*.arrow"), "model": ()}
MAX_GITATTRIBUTES_BYTES = 256 * 1024


def _translate(pattern: str) -> re.Pattern[str]:
    """A gitattributes pattern as a regex over repo paths (`*` stays within a folder, `**` crosses)."""
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.lstrip("/")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(prefix + "".join(out) + "$")


def parse_rules(text: str) -> list[Rule]:
    """LFS rules of a `.gitattributes`: `(pattern, is_lfs)` in file order (the last match wins)."""
    rules: list[Rule] = []
    for line in text[:MAX_GITATTRIBUTES_BYTES].splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#") or parts[0].startswith("!"):
            continue
        attrs = parts[1:]
        if "filter=lfs" in attrs:
            rules.append((_translate(parts[0]), True))
        elif any(a in ("-filter", "!filter") or a.startswith("filter=") for a in attrs):
            rules.append((_translate(parts[0]), False))
    return rules


def default_rules(repo_type: str) -> list[Rule]:
    """Rules for a repo without `.gitattributes`."""
    return [(_translate(p), True) for p in DEFAULT_PATTERNS.get(repo_type, ())]


def is_lfs(path: str, rules: Sequence[Rule]) -> bool:
    """Whether `path` matches the rules as an LFS file."""
    verdict = False
    for regex, lfs in rules:
        if regex.match(path):
            verdict = lfs
    return verdict
