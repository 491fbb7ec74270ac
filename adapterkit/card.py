"""The model card (README.md) of a family: Hub metadata plus a per-domain table."""

from __future__ import annotations

from typing import Any

import yaml

TAGS = ["adapterkit", "residual-adapters", "continual-learning", "image-classification"]


def base_model_id(backbone_name: str | None) -> str | None:
    """The Hub repo id of a backbone: `hf-hub:org/name` -> `org/name`, a tagged timm name ->
    `timm/<name>`, any other timm name as it is (our registry indexes it the same way)."""
    if not backbone_name:
        return None
    if backbone_name.startswith("hf-hub:"):
        return backbone_name.removeprefix("hf-hub:").split("@")[0]
    if backbone_name.startswith("local-dir:"):
        return None
    return f"timm/{backbone_name}" if "." in backbone_name else backbone_name


def domain_tag(name: str) -> str:
    return f"domain:{name}"


def model_card(config: dict[str, Any]) -> str:
    """A README.md with `library_name: adapterkit`, `base_model`, one tag per domain and a metrics table."""
    backbone = config["backbone"]
    domains = config["domains"]
    meta: dict[str, Any] = {"library_name": "adapterkit", "pipeline_tag": "image-classification"}
    base = base_model_id(backbone.get("name"))
    if base:
        meta["base_model"] = base
    meta["tags"] = TAGS + [domain_tag(d) for d in domains]
    metric_names = sorted({m for e in domains.values() for m in (e.get("metrics") or {})})
    rows = []
    for name, e in domains.items():
        metrics = e.get("metrics") or {}
        cells = [
            f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else "" for m in metric_names
        ]
        rows.append(
            f"| {name} | {e['num_classes']} | {e['parameters']:,} | {e['bytes']:,} | "
            + " | ".join(cells)
            + " |"
        )
    header = "| domain | classes | added parameters | bytes | " + " | ".join(metric_names) + " |"
    rule = "|---|---|---|---|" + "---|" * len(metric_names)
    rules = config["adapter_config"]
    return (
        "---\n"
        + yaml.safe_dump(meta, sort_keys=False)
        + "---\n\n"
        + f"# adapterkit family on `{backbone.get('name')}`\n\n"
        + f"{len(domains)} domain(s) of residual adapters (Rebuffi et al., CVPR 2018: {rules['topology']} "
        + f"topology, placement {rules['placement']}) on a frozen backbone (fingerprint `{backbone['fingerprint']}`). "
        + "Each domain owns its adapters, norms and head; the backbone is not stored here.\n\n"
        + (header + "\n" + rule + "\n" + "\n".join(rows) + "\n\n" if rows else "")
        + "## Usage\n\n```python\nfrom adapterkit import AdapterModel\n\n"
        + 'model = AdapterModel.from_pretrained("<repo_id>", domains=["'
        + (next(iter(domains), "<domain>"))
        + '"])\nlogits = model(images, domain="'
        + (next(iter(domains), "<domain>"))
        + '")\n```\n'
    )
