"""Mid-domain training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds two files::

    checkpoint.json          {"format_version", "tensors": "step-00000120.safetensors", "sha256", "state"}
    step-00000120.safetensors

`state` is any nested structure of dicts, lists, tuples, numbers, strings and tensors (the training
step, the optimizer's state dict, RNG states, ...): each tensor is stored in the safetensors file
under its path in the structure (`optimizer/state/3/momentum_buffer`) and replaced in the JSON by
`{"__tensor__": path}`; dicts with non-string keys (an optimizer's parameter indices) and tuples are
tagged so they come back as they went in. The tensors file is written first and the JSON last (both
atomically), so a crash leaves the previous checkpoint readable; older tensors files are then removed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from .family import atomic_write

FORMAT_VERSION = 1
INDEX = "checkpoint.json"


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (tensors, JSON values only)"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, state: dict[str, Any], step: int) -> Path:
    """Write `state` (tensors and JSON values) as the checkpoint of `directory`, replacing the previous one.

    Example:
        >>> save_checkpoint("out/ckpt", {"step": 3, "rng": torch.get_rng_state()}, step=3)
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    data = save(tensors, metadata={"format": "pt"})
    name = f"step-{step:08d}.safetensors"
    atomic_write(directory / name, data)
    index = {
        "format_version": FORMAT_VERSION,
        "tensors": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "state": encoded,
    }
    atomic_write(directory / INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    for old in directory.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The state saved by `save_checkpoint`, or None if `directory` holds no checkpoint.

    Raises:
        ValueError: the checkpoint is corrupt, truncated or from another format version.
    """
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        return None
    try:
        index = json.loads((directory / INDEX).read_text())
        data = (directory / index["tensors"]).read_bytes()
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"checkpoint in {directory} is unreadable ({e}); delete the folder to start afresh"
        ) from e
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint in {directory} has format_version {index.get('format_version')!r}, not 1"
        )
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise ValueError(f"{index['tensors']} in {directory} does not match its checksum: delete the folder")
    return _decode(index["state"], load(data))
