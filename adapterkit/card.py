"""The model card (README.md) of a family, built with `huggingface_hub.ModelCard`: Hub metadata the
Hub's checks accept (`base_model` only when it is a Hub repo id, a `model-index` with each domain's
accuracy), a per-domain table, and a usage snippet that runs as written."""

from __future__ import annotations

from typing import Any

TAGS = ["adapterkit", "residual-adapters", "continual-learning", "image-classification"]


def base_model_id(backbone_name: str | None) -> str | None:
    """The Hub repo id of a backbone, or None when it is not one: `hf-hub:org/name` -> `org/name`, a
    timm name with a pretrained tag (`resnet50.a1_in1k`) -> `timm/resnet50.a1_in1k`; a bare
    architecture name (`cifar_resnet20`) or a `local-dir:` path names no repo."""
    if not backbone_name:
        return None
    if backbone_name.startswith("hf-hub:"):
        return backbone_name.removeprefix("hf-hub:").split("@")[0]
    if backbone_name.startswith("local-dir:") or "." not in backbone_name:
        return None
    return f"timm/{backbone_name}"


def domain_tag(name: str) -> str:
    return f"domain:{name}"


def backbone_tag(name: str) -> str:
    return f"backbone:{name}"


def _eval_results(domains: dict[str, dict[str, Any]]) -> list:
    from huggingface_hub import EvalResult

    results = []
    for name, entry in domains.items():
        accuracy = (entry.get("metrics") or {}).get("accuracy")
        if isinstance(accuracy, (int, float)):
            split = (entry.get("metadata") or {}).get("eval_split", "test")
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=name,
                    dataset_name=name,
                    dataset_split=split,
                    metric_type="accuracy",
                    metric_value=float(accuracy),
                )
            )
    return results


def _table(domains: dict[str, dict[str, Any]]) -> str:
    metric_names = sorted({m for e in domains.values() for m in (e.get("metrics") or {})})
    header = ["domain", "classes", "added parameters", "bytes", *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in domains.items():
        metrics = e.get("metrics") or {}
        cells = [
            f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else "" for m in metric_names
        ]
        row = [
            name,
            str(e.get("num_classes", "")),
            f"{e.get('parameters', 0):,}",
            f"{e.get('bytes', 0):,}",
            *cells,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def model_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md for a family config with its domain table; `repo_id` goes into the usage snippet
    (default: loading the folder the card sits in)."""
    from huggingface_hub import ModelCard, ModelCardData

    backbone, domains, rules = config["backbone"], config["domains"], config["adapter_config"]
    name = backbone.get("name")
    tags = TAGS + ([backbone_tag(name)] if name else []) + [domain_tag(d) for d in domains]
    data = ModelCardData(
        library_name="adapterkit",
        pipeline_tag="image-classification",
        tags=tags,
        base_model=base_model_id(name),
        model_name=repo_id or f"adapterkit family on {name}",
        eval_results=_eval_results(domains) or None,
    )
    first = next(iter(domains), None)
    source = repo_id or "path/to/this/folder"
    snippet = (
        "```python\nimport torch\nfrom adapterkit import AdapterModel\n\n"
        f'model = AdapterModel.from_pretrained("{source}"'
        + (f', domains=["{first}"]' if first else "")
        + ")  # eval mode; only these domains' files are downloaded\n"
        + (
            f"images = torch.randn(2, {_input_size(domains[first], backbone)})  # preprocess real images with "
            f'model.domain_info("{first}").data_config\n'
            f'with torch.no_grad():\n    logits = model(images, domain="{first}")\n'
            if first
            else ""
        )
        + "```"
    )
    body = (
        f"# adapterkit family on `{name}`\n\n"
        f"{len(domains)} domain(s) of residual adapters (Rebuffi et al., CVPR 2018: {rules['topology']} topology, "
        f"placement {rules['placement']}) on a frozen backbone (fingerprint `{backbone['fingerprint']}`). "
        "Each domain owns its adapters, norms and head; the backbone is not stored here.\n\n"
        + (_table(domains) + "\n\n" if domains else "")
        + "## Usage\n\n"
        + snippet
        + "\n"
    )
    return str(
        ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body=body)
    )


def _input_size(entry: dict[str, Any], backbone: dict[str, Any]) -> str:
    """`C, H, W` of a domain's images, from its data config (224 px when it records none)."""
    size = (entry.get("data_config") or {}).get("input_size")
    if isinstance(size, int):
        size = [backbone.get("in_chans") or 3, size, size]
    size = size or [backbone.get("in_chans") or 3, 224, 224]
    return ", ".join(str(int(v)) for v in size)
