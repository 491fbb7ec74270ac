"""The training loop behind `adapterkit.train`: a plain loop on an `Accelerator` handed to it.

`fit` reads as Accelerate's examples do (`prepare`, `accumulate`, `backward`), with each added
feature in a named step: exact mid-epoch resume from a safetensors + JSON checkpoint
(`checkpoint.py`), a private RNG (training never reseeds the caller's), CPU threads, and BatchNorm
statistics averaged over processes at the end. Only Accelerate's public API is used, and this module
never imports accelerate (`train.py` creates the Accelerator); it only calls the object it is given.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import checkpoint_folder, restore_rng, restore_training, save_training
from .data import DomainDataset, EpochBatches
from .train_config import GROUPS, TrainConfig, learning_rate
from .train_env import (
    Call,
    channels_last,
    grad_checkpointing,
    private_rng,
    seed_rng,
    threads,
    wants_channels_last,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """What `fit` trains: a module, the parameters it optimises, how to call it, what a checkpoint holds."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    tensors: Callable[[], dict[str, torch.Tensor]]
    norms: list[nn.Module] = field(default_factory=list)
    groups: dict[str, list[nn.Parameter]] | None = None  # by GROUPS name; None: `plain_groups`
    # grad_checkpointing: the timm model that recomputes (None: `module`), what its backward runs under
    # (a domain job holds its domain there) and the modules whose buffers training updates (None: `norms`)
    backbone: nn.Module | None = None
    backward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    stateful: list[nn.Module] | None = None


@dataclass
class Plan:
    """How long a job trains (optimizer steps), its adapters' (or backbone's) weight decay and where
    its checkpoints go."""

    per_epoch: int
    total: int
    weight_decay: float
    folder: Path | None

    @classmethod
    def of(cls, job: Job, n: int, config: TrainConfig, world: int, resume: bool | str | Path) -> Plan:
        per_epoch = n // (config.batch_size * world) // config.grad_accum
        wd = config.group_weight_decay("adapter", n)
        folder = checkpoint_folder(config, job.name, resume)
        return cls(per_epoch, config.steps or config.epochs * per_epoch, wd, folder)

    def checkpoint_due(self, step: int, every: int | None) -> bool:
        """Whether a checkpoint is written after optimizer step `step` (never after the last one)."""
        return self.folder is not None and bool(every) and step % every == 0 and step < self.total


def fit(
    job: Job,
    train_set: DomainDataset,
    eval_set: DomainDataset | None,
    config: TrainConfig,
    acc: Accelerator,
    resume: bool | str | Path,
    callback: Callable[[dict[str, Any]], None] | None,
) -> dict[str, float]:
    """Train `job` for the config's steps, average its BatchNorm statistics, evaluate it on `eval_set`.

    The caller's RNG state, torch's thread count and the module's `requires_grad` flags and training
    mode are as before when it returns (or raises).
    """
    plan = Plan.of(job, len(train_set), config, acc.num_processes, resume)
    recomputes = grad_checkpointing(job.backbone or job.module, config.grad_checkpointing)
    with recomputes, threads(config.threads), private_rng(acc.device), _only_job_trains(job, acc.device):
        optimizer = _optimizer(config, job, len(train_set))
        state = None
        if resume:  # before prepare, so that DDP starts from rank 0's copy
            tensors, world = job.tensors(), acc.num_processes
            state = restore_training(plan.folder, job.name, tensors, optimizer, config, len(train_set), world)
        acc.free_memory()  # between two trainings, as accelerate advises: this also restarts accumulation
        with channels_last(job.module, wants_channels_last(config, job.module, acc.device)) as fmt:
            model, optimizer = acc.prepare(Call(job.module, job.forward, fmt), optimizer)
            try:
                step, loss_sum = _continue(state, config, acc)
                own_trackers = _start_trackers(job.name, config, plan, acc)
                start = time.perf_counter()
                step, loss_sum = _train(
                    job, plan, model, optimizer, train_set, config, acc, step, loss_sum, callback
                )
                seconds = time.perf_counter() - start
            finally:
                acc.free_memory()  # the accelerator forgets this job's model and optimizer
        metrics = _finish(job, plan, eval_set, config, acc, step, loss_sum) | {"seconds": seconds}
    if own_trackers:
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers.clear()  # finished: the next training on this accelerator starts its own run
    if plan.folder is not None and acc.is_main_process:
        for f in (*plan.folder.glob("step-*.safetensors"), plan.folder / "checkpoint.json"):
            f.unlink(missing_ok=True)  # the domain is complete: its checkpoint is not needed any more
    return metrics


def _train(
    job: Job,
    plan: Plan,
    model: nn.Module,
    optimizer: Any,
    train_set: DomainDataset,
    config: TrainConfig,
    acc: Accelerator,
    step: int,
    loss_sum: list,
    callback: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, list]:
    """The loop: micro-batches until `plan.total` optimizer steps, with logging and checkpoints."""
    cpu = torch.get_num_threads()
    desc = f"{job.name} ({cpu} thread{'' if cpu == 1 else 's'})"  # see TrainConfig.threads
    bar = tqdm(
        total=plan.total,
        initial=step,
        desc=desc,
        unit="step",
        disable=not (config.progress and acc.is_main_process),
    )
    window: list[torch.Tensor] = []  # the micro-batch losses of the current optimizer step
    try:
        while step < plan.total:
            epoch, done = divmod(step, plan.per_epoch)
            if done == 0:
                loss_sum = [0.0, 0]
            for x, y in _epoch_batches(train_set, config, acc, epoch, done, plan.per_epoch):
                lr = learning_rate(config, step, plan.total)
                window.append(_micro_step(model, optimizer, job, x, y, lr, config, acc))
                if not acc.sync_gradients:
                    continue
                step += 1
                step_loss = torch.stack(window).mean().item()
                window.clear()
                loss_sum = [loss_sum[0] + step_loss, loss_sum[1] + 1]
                bar.update(1)
                if step % config.log_every == 0 or step == plan.total:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
                    acc.log({f"{job.name}/loss": step_loss, f"{job.name}/lr": lr}, step=step)
                if plan.checkpoint_due(step, config.checkpoint_every):
                    n, tensors = len(train_set), job.tensors()
                    save_training(plan.folder, acc, job.name, tensors, optimizer, config, step, n, loss_sum)
                if callback is not None:
                    callback({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr})
                if step >= plan.total:
                    break
    finally:
        bar.close()
    return step, loss_sum


def _micro_step(
    model: nn.Module,
    optimizer: Any,
    job: Job,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    config: TrainConfig,
    acc: Accelerator,
) -> torch.Tensor:
    """One micro-batch: forward and backward; the optimizer steps when the accumulation is complete."""
    x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
    with acc.accumulate(model):
        loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
        with _recomputing(job, config.grad_checkpointing):
            acc.backward(loss)
        if acc.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            if config.max_grad_norm:
                acc.clip_grad_norm_(job.params, config.max_grad_norm)
        optimizer.step()  # accelerate's optimizer skips the step until the accumulation is complete
        optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


@contextlib.contextmanager
def _recomputing(job: Job, on: bool) -> Iterator[None]:
    """A backward that recomputes the checkpointed blocks' forward (with `on`): under the job's `backward`
    context, which routes the recomputed calls as the forward was, and with the trained norms' running
    statistics as the forward left them (the recomputation updates them a second time, which is undone)."""
    if not on:
        yield
        return
    modules = job.norms if job.stateful is None else job.stateful
    saved = [(t, t.clone()) for m in modules for t in m.buffers()]
    with job.backward():
        yield
    with torch.no_grad():
        for t, before in saved:
            t.copy_(before)


def _epoch_batches(
    train_set: DomainDataset, config: TrainConfig, acc: Accelerator, epoch: int, done: int, per_epoch: int
) -> DataLoader:
    """This process's batches of `epoch` from optimizer step `done` on (mid-epoch resume)."""
    sampler = EpochBatches(
        len(train_set),
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        rank=acc.process_index,
        world_size=acc.num_processes,
        start=done * config.grad_accum,
        stop=per_epoch * config.grad_accum,
    )
    # own generator: creating a DataLoader iterator must not draw from the RNG (exact resume)
    return DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        generator=torch.Generator(),
        pin_memory=acc.device.type == "cuda",
    )


def _finish(
    job: Job,
    plan: Plan,
    eval_set: DomainDataset | None,
    config: TrainConfig,
    acc: Accelerator,
    step: int,
    loss_sum: list,
) -> dict[str, float]:
    """Average the BatchNorm statistics over processes, sum the losses, evaluate."""
    _average_norms(acc, job.norms)
    totals = acc.reduce(torch.tensor(loss_sum, dtype=torch.float64, device=acc.device), "sum")
    metrics = {"steps": float(step), "epochs": step / plan.per_epoch, "weight_decay": plan.weight_decay}
    metrics["train_loss"] = float(totals[0] / max(totals[1], 1))
    if eval_set is not None:
        metrics["accuracy"] = evaluate_dataset(
            job.module, job.forward, eval_set, config, acc, f"{job.name} eval"
        )
        acc.log({f"{job.name}/accuracy": metrics["accuracy"]}, step=step)
    return metrics


def evaluate_dataset(
    module: nn.Module,
    forward: Callable,
    dataset: DomainDataset,
    config: TrainConfig,
    acc: Accelerator,
    desc: str | None,
) -> float:
    """Top-1 accuracy over all processes: each evaluates every `num_processes`-th image and the counts
    are summed (no padding, so nothing to drop, and nothing registered with the accelerator)."""
    loader = DataLoader(
        dataset,
        batch_size=config.eval_batch_size or 2 * config.batch_size,
        sampler=range(acc.process_index, len(dataset), acc.num_processes),
        num_workers=config.num_workers,
        generator=torch.Generator(),
        pin_memory=acc.device.type == "cuda",
    )
    was_training = module.training
    module.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=acc.device)  # correct, seen
    try:
        with torch.no_grad():
            bar = not (config.progress and acc.is_main_process)
            for x, y in tqdm(loader, desc=desc, leave=False, disable=bar):
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                with acc.autocast():
                    pred = forward(module, x).argmax(-1)
                counts[0] += (pred == y).sum()
                counts[1] += y.numel()
    finally:
        module.train(was_training)
    correct, total = acc.reduce(counts, "sum").tolist()
    return correct / max(total, 1)


@contextlib.contextmanager
def _only_job_trains(job: Job, device: torch.device) -> Iterator[None]:
    """Only the job's parameters require gradients (so DDP syncs, and the optimizer sees, only them),
    in training mode; the flags and the mode are restored afterwards."""
    module = job.module.to(device)
    flags, was_training = [(p, p.requires_grad) for p in module.parameters()], module.training
    module.requires_grad_(False)
    for p in job.params:
        p.requires_grad_(True)
    module.train()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def _optimizer(config: TrainConfig, job: Job, num_images: int) -> torch.optim.Optimizer:
    """One parameter group per non-empty `GROUPS` entry, each with its `lr_scale` and weight decay
    (the group's settings travel in the optimizer's state, so a checkpoint restores them)."""
    groups = job.groups if job.groups is not None else plain_groups(job.module, job.params)
    param_groups = [
        {
            "params": groups[name],
            "name": name,
            "lr_scale": config.group_lr_scale(name),
            "lr": config.lr * config.group_lr_scale(name),
            "weight_decay": config.group_weight_decay(name, num_images),
        }
        for name in GROUPS
        if groups.get(name)
    ]
    if sum(len(g["params"]) for g in param_groups) != len(job.params):
        raise ValueError(f"{job.name}: the parameter groups {list(groups)} do not hold the job's parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas)
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum)


def plain_groups(module: nn.Module, params: list[nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    """A plain classifier's `params` by group: its classifier (`head`), its norms' affine parameters
    (`norm`), every other weight (`backbone`)."""
    head = module.get_classifier() if hasattr(module, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in module.modules() if isinstance(m, norm_types) for p in m.parameters(False)}
    groups: dict[str, list[nn.Parameter]] = {"head": [], "norm": [], "backbone": []}
    for p in params:
        groups["head" if id(p) in head_ids else "norm" if id(p) in norm_ids else "backbone"].append(p)
    return groups


def _start_trackers(name: str, config: TrainConfig, plan: Plan, acc: Accelerator) -> bool:
    """Start the config's trackers unless the accelerator already has some (the caller's run)."""
    if not config.log_with or acc.trackers:
        return False
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
    acc.init_trackers(f"adapterkit-{name}", config=flat | {"weight_decay_used": plan.weight_decay})
    return True


def _average_norms(acc: Accelerator, norms: list[nn.Module]) -> None:
    """Average the trained BatchNorm running statistics over processes (each saw its own shard)."""
    if acc.num_processes == 1:
        return
    with torch.no_grad():
        for norm in norms:
            for t in (norm.running_mean, norm.running_var):
                if t is not None:
                    t.copy_(acc.reduce(t.clone(), "mean"))


def _continue(state: dict[str, Any] | None, config: TrainConfig, acc: Accelerator) -> tuple[int, list]:
    """The step and loss sums to start from; the RNG is the checkpoint's, or seeded from the config."""
    if state is None:
        seed_rng(config.seed + acc.process_index, acc.device)  # dropout; different per process
        return 0, [0.0, 0]
    restore_rng(state, acc)
    return state["step"], state["loss"]
