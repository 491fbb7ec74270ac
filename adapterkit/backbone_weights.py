"""Backbone weights read as safetensors only: the file timm is to load, resolved before timm sees it.

`timm.create_model(name, pretrained=True)` picks the weights source itself, and several of its sources
are pickles read with `torch.load`: a Hub repo without `model.safetensors` (it falls back to
`pytorch_model.bin`), a `local-dir:` folder without one (`pytorch_model.bin`, `*.pth`), a pretrained
config's `url` (`torch.hub`) or a `.pth`/`.bin` `file`. `safetensors_weights` resolves the source timm
would use to a local safetensors file (downloading only that file from the Hub) or refuses it before
anything is read; `create_backbone` then hands timm that file alone (`source="file"`), so timm's
`load_pretrained` takes its `file` branch, which reads a `.safetensors` file with `safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HF_SAFE_WEIGHTS = "model.safetensors"  # what timm's save_for_hf / push_to_hf_hub write
HF_CONFIG = "config.json"
_FIX = (
    "convert them once, where you trust the file, with safetensors.torch.save_file(state_dict, "
    "'model.safetensors') and pass that file (pretrained=PATH, CLI --pretrained PATH; for a saved family "
    "backbone_weights=PATH, CLI --backbone-weights PATH)"
)


class PickledWeightsError(ValueError):
    """A backbone's weights source holds them only as a pickle (`torch.load`), which adapterkit never reads."""


def check_weights_file(path: Path) -> Path:
    """Refuse a weights file that is missing or not safetensors: timm would read any other file with
    `torch.load`, which unpickles (and fails on a stray file with a bare `KeyError`)."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist; pass a .safetensors path")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"backbone weights file {path} is not a .safetensors file: adapterkit reads weights only as "
            "safetensors, never pickle; convert a state dict with "
            "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(
            f"backbone weights file {path} is not a readable safetensors file ({e}); pass an intact "
            ".safetensors file (re-download or re-save it)"
        ) from e
    return path


def safetensors_weights(name: str, timm_kwargs: dict[str, Any]) -> Path | None:
    """The local safetensors file of `name`'s pretrained weights, from the source timm would read them
    from (`hf-hub:` repo, `local-dir:` folder, the pretrained config's `file` or `hf_hub_id`, with
    `timm_kwargs`' `pretrained_cfg`/`pretrained_cfg_overlay`); None where timm has no source (it then
    raises its own error: unknown model, no pretrained weights) or is given a state dict in memory.

    Raises:
        PickledWeightsError: (a ValueError) the source holds its weights only as a pickle
            (`pytorch_model.bin`, `.pth`, a URL); nothing has been read from it.
    """
    import timm.models

    overlay = dict(timm_kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("state_dict") is not None:
        return None
    if overlay.get("file"):
        return check_weights_file(Path(overlay["file"]))
    source, model_id = timm.models.parse_model_name(name)  # as timm reads it (`hf_hub:`, any case)
    if source == "local-dir":
        return _local_dir_weights(Path(model_id), name)
    if source == "hf-hub":
        cfg = {**_hub_config(model_id, timm_kwargs.get("cache_dir")), **overlay}
        return _hub_weights(model_id, cfg.get("hf_hub_filename"), name, timm_kwargs.get("cache_dir"))
    arch, tag = timm.models.split_model_name_tag(model_id)
    if not timm.is_model(arch):
        return None  # timm raises its own error for the name
    cfg = timm.models.resolve_pretrained_cfg(arch, timm_kwargs.get("pretrained_cfg") or tag, overlay)
    if cfg.state_dict is not None:  # timm's order: a state dict, a file, a Hub repo, a URL
        return None
    if cfg.file:
        return check_weights_file(Path(cfg.file))
    if cfg.hf_hub_id:
        return _hub_weights(cfg.hf_hub_id, cfg.hf_hub_filename, name, timm_kwargs.get("cache_dir"))
    if cfg.url:
        raise PickledWeightsError(
            f"backbone {name!r} has no safetensors weights: timm would download them from {cfg.url} and "
            f"read them with torch.load (a pickle); adapterkit reads backbone weights only as safetensors, "
            f"never pickle: {_FIX}"
        )
    return None


def _local_dir_weights(folder: Path, name: str) -> Path | None:
    """`<folder>/model.safetensors`, else the folder's only (or first) `*.safetensors`."""
    if not folder.is_dir():
        return None  # timm says the folder or its config.json does not exist
    found = [folder / HF_SAFE_WEIGHTS] if (folder / HF_SAFE_WEIGHTS).is_file() else []
    found = found or sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return check_weights_file(found[0])
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".tar"))
    held = f"it holds {', '.join(pickles)}, read with torch.load (a pickle)" if pickles else "it holds none"
    raise PickledWeightsError(
        f"backbone {name!r} has no safetensors weights: {folder} has no {HF_SAFE_WEIGHTS} ({held}); "
        f"adapterkit reads backbone weights only as safetensors, never pickle: {_FIX}, or save it as "
        f"{folder / HF_SAFE_WEIGHTS}"
    )


def _hub_config(model_id: str, cache_dir: str | Path | None) -> dict[str, Any]:
    """The pretrained config of an `hf-hub:` repo's `config.json` (JSON, as timm reads it)."""
    text = Path(_download(model_id, HF_CONFIG, cache_dir)).read_text(encoding="utf-8")
    cfg = json.loads(text)
    return dict(cfg.get("pretrained_cfg", cfg)) if isinstance(cfg, dict) else {}


def _hub_weights(hub_id: str, filename: str | None, name: str, cache_dir: str | Path | None) -> Path:
    """The repo's safetensors weights (the file timm prefers: `filename` if safetensors, else its
    safetensors alternative), downloaded alone; refused when the repo has none."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    wanted = _safe_names(filename or "pytorch_model.bin")
    for candidate in wanted:
        try:
            return check_weights_file(Path(_download(hub_id, candidate, cache_dir)))
        except LocalEntryNotFoundError:
            raise  # offline and not cached: whether the repo has it is unknown
        except EntryNotFoundError:
            continue
    repo, _, revision = hub_id.partition("@")
    at = f" at revision {revision}" if revision else ""
    what = f"no {' or '.join(wanted)}" if wanted else f"its weights only as {filename}, not safetensors"
    raise PickledWeightsError(
        f"backbone {name!r} has no safetensors weights: the Hub repo {repo}{at} has {what} (timm would "
        f"fall back to {filename or 'pytorch_model.bin'}, read with torch.load, a pickle); adapterkit "
        f"reads backbone weights only as safetensors, never pickle: {_FIX}, or upload it to {repo} as "
        f"{wanted[0] if wanted else HF_SAFE_WEIGHTS}"
    )


def _safe_names(filename: str) -> list[str]:
    """The safetensors names timm tries for a Hub weights file (timm's `_get_safe_alternatives`)."""
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == "pytorch_model.bin":
        return [HF_SAFE_WEIGHTS]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    return [filename.removesuffix(".bin") + ".safetensors"] if filename.endswith(".bin") else []


def _download(hub_id: str, filename: str, cache_dir: str | Path | None) -> str:
    """`hf_hub_download` of one file of `org/name[@revision]`, as timm downloads it (HF_ENDPOINT, the
    offline flag, the token and the cache all apply)."""
    import timm
    from huggingface_hub import hf_hub_download

    repo, _, revision = hub_id.partition("@")
    return hf_hub_download(
        repo,
        filename,
        revision=revision or None,
        cache_dir=cache_dir,
        library_name="timm",
        library_version=timm.__version__,
    )
