"""What a training holds around its model while `loop.fit` runs: the module accelerate prepares in the
model's place, the model's memory layout, its gradient checkpointing, torch's CPU threads and a private,
seeded RNG. Each is set for the training and restored afterwards, so the caller's process is as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .layers.table import packed_buffers
from .train_config import TrainConfig


class Call(nn.Module):
    """What `prepare` wraps (DDP, mixed precision's autocast) in place of the caller's model, which
    accelerate then never patches or marks: every `fit` prepares afresh, and nothing is left to undo."""

    def __init__(
        self,
        module: nn.Module,
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__()
        self.module, self.call, self.memory_format = module, forward, memory_format
        # Frozen domains' packed tensors are buffers that never change: DDP must not broadcast them at
        # every step (rank 0's are everyone's already); the trained domain's norm statistics still are.
        frozen = [f"module.{name}" for name in packed_buffers(module)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return self.call(self.module, x)


def wants_channels_last(config: TrainConfig, module: nn.Module, device: torch.device) -> bool:
    """`config.channels_last`, with "auto" read as: a model with 2-D convs, on CPU."""
    if config.channels_last != "auto":
        return bool(config.channels_last)
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in module.modules())


@contextlib.contextmanager
def channels_last(module: nn.Module, on: bool) -> Iterator[torch.memory_format]:
    """With `on`, the module's contiguous 4-D weights and buffers in channels-last memory for the block
    (the same values, the same tensor objects), then back: on CPU, oneDNN's convs and train-mode BatchNorm
    run faster on NHWC maps. Yields the memory format batches should take."""
    moved = [
        t for t in (*module.parameters(), *module.buffers()) if on and t.dim() == 4 and t.is_contiguous()
    ]
    for t in moved:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield torch.channels_last if on else torch.contiguous_format
    finally:
        for t in moved:
            t.data = t.data.contiguous()
        module.train(module.training)  # drops eval-mode fused weights built from the channels-last copies


def backbone_name(module: nn.Module) -> str:
    """The timm architecture of `module` (its class name when it has none)."""
    cfg = getattr(module, "pretrained_cfg", None)
    return (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(module).__name__


@contextlib.contextmanager
def grad_checkpointing(module: nn.Module, on: bool) -> Iterator[None]:
    """With `on`, the timm model `module` recomputes its blocks' activations in backward for the block
    (`set_grad_checkpointing(True)`); afterwards its own setting is back (every `grad_checkpointing` flag
    of its modules as it was).

    Raises:
        ValueError: the model has no gradient checkpointing (before anything runs).
    """
    if not on:
        yield
        return
    flags = {m: vars(m)["grad_checkpointing"] for m in module.modules() if "grad_checkpointing" in vars(m)}
    setter = getattr(module, "set_grad_checkpointing", None)
    refusal = None if callable(setter) else "has no set_grad_checkpointing()"
    if refusal is None:
        try:
            setter(True)
        except (AssertionError, NotImplementedError, RuntimeError, TypeError) as e:
            refusal = f"refuses set_grad_checkpointing(True) ({type(e).__name__}: {e})"
    try:
        if refusal is not None:
            raise ValueError(
                f"backbone {backbone_name(module)} {refusal}, so it cannot recompute its activations in "
                "backward: train without grad_checkpointing=True, or on a timm backbone that supports it"
            )
        yield
    finally:
        _restore_checkpointing(module, setter, flags)


def check_grad_checkpointing(module: nn.Module, on: bool) -> None:
    """With `on`, refuse now (ValueError) a model `grad_checkpointing` would refuse, leaving it as it was."""
    with grad_checkpointing(module, on):
        pass


def _restore_checkpointing(module: nn.Module, setter: Callable | None, flags: dict[nn.Module, bool]) -> None:
    if callable(setter):
        with contextlib.suppress(AssertionError, NotImplementedError, RuntimeError, TypeError):
            setter(any(flags.values()))
    for m in module.modules():
        if m in flags:
            m.grad_checkpointing = flags[m]
        elif "grad_checkpointing" in vars(m):
            del m.grad_checkpointing  # set by the training, absent before


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` for the block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def private_rng(device: torch.device) -> Iterator[None]:
    """Run the block on a fork of torch's RNG (the CPU's, and `device`'s when it is a GPU): whatever
    the block seeds or draws (initialisation, dropout), the caller's RNG is unchanged afterwards."""
    gpus = []
    if device.type == "cuda":
        gpus = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=gpus):
        yield


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the CPU's RNG and `device`'s (this process's GPU only: `private_rng` restores just that one)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on a private RNG seeded with `seed`; the caller's RNG is unchanged afterwards.

    Example:
        >>> with seeded(0, torch.device("cpu")):
        ...     head = nn.Linear(8, 3)  # the same weights for seed 0, whatever the caller drew before
    """
    with private_rng(device):
        seed_rng(seed, device)
        yield
