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

`save_training` / `restore_training` / `restore_rng` are what the training loop keeps in one: the
step, the trained tensors, the optimizer, every process's RNG, the loss scaler, the running loss, and
the settings that must match for an exact resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save

from .format import atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .train_config import TrainConfig

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------- the training state
def checkpoint_folder(config: TrainConfig, name: str, resume: bool | str | Path) -> Path | None:
    """Where `name`'s checkpoints live: the `resume` folder, else `output_dir/checkpoints/<name>`."""
    if resume not in (False, True):
        return Path(resume)
    if resume and not config.output_dir:
        raise ValueError(
            "resume=True needs TrainConfig(output_dir=...) (checkpoints live in output_dir/checkpoints)"
        )
    return Path(config.output_dir) / "checkpoints" / name if config.output_dir else None


def save_training(
    folder: Path,
    acc: Accelerator,
    name: str,
    tensors: dict[str, torch.Tensor],
    optimizer: Any,
    config: TrainConfig,
    step: int,
    n: int,
    loss: list,
) -> None:
    """Write the state of `name`'s training after optimizer step `step` (every process's RNG
    gathered, written by the main process)."""
    rng = {"torch": acc.gather(torch.get_rng_state().to(acc.device)[None]).cpu()}
    if acc.device.type == "cuda":
        rng["cuda"] = acc.gather(torch.cuda.get_rng_state().to(acc.device)[None]).cpu()
    if acc.is_main_process:
        state = {
            "domain": name,
            "step": step,
            "loss": loss,
            "num_images": n,
            "world_size": acc.num_processes,
            "config": config.trajectory(),
            "tensors": tensors,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        save_checkpoint(folder, state, step)
    acc.wait_for_everyone()


def restore_training(
    folder: Path | None,
    name: str,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    n: int,
    world: int,
) -> dict[str, Any] | None:
    """Load the checkpoint of `name` into `tensors` and `optimizer`; the state, or None when there is none.

    Raises:
        ValueError: it was written with other settings, another training-set size or number of
            processes, or for other tensors.
    """
    state = load_checkpoint(folder) if folder is not None else None
    if state is None:
        logger.warning("no checkpoint of %r in %s: its training starts at step 0", name, folder)
        return None
    fix = f"resume with the settings it was written with, or delete {folder} to start afresh"
    ours = config.trajectory()
    diff = sorted(k for k in ours if ours[k] != state["config"].get(k))
    if state["domain"] != name or diff:
        raise ValueError(
            f"the checkpoint in {folder} ({state['domain']!r}) differs in {diff or 'domain'}: {fix}"
        )
    if (state["num_images"], state["world_size"]) != (n, world):
        raise ValueError(
            f"the checkpoint in {folder} was written for {state['num_images']} training images on "
            f"{state['world_size']} processes (now {n} on {world}): {fix}"
        )
    if set(tensors) != set(state["tensors"]):
        raise ValueError(f"the checkpoint in {folder} holds other tensors than {name!r} has: {fix}")
    with torch.no_grad():
        for key, t in tensors.items():
            t.copy_(state["tensors"][key])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("%r resumes at step %d from %s", name, state["step"], folder)
    return state


def restore_rng(state: dict[str, Any], acc: Accelerator) -> None:
    """This process's RNG (CPU, and its GPU) and the fp16 loss scaler as the checkpoint holds them."""
    rank = acc.process_index
    torch.set_rng_state(state["rng"]["torch"][rank])
    if state["rng"].get("cuda") is not None and acc.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"][rank])
    if state.get("scaler") and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
