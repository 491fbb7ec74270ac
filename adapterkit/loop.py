"""The training loop behind `adapterkit.train`: a plain loop on an `Accelerator` handed to it.

`prepare`, `accumulate`, `backward`, `gather_for_metrics` as in Accelerate's examples, plus what
the examples leave out: exact mid-epoch resume from a safetensors + JSON checkpoint (`checkpoint.py`),
and BatchNorm statistics averaged over processes at the end. This module never imports accelerate
(`train.py` creates the Accelerator); it only calls the object it is given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data import DomainDataset, EpochBatches

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .train import TrainConfig

logger = logging.getLogger(__name__)

# The paper's weight decay by training-set size: (images below, decay); the last applies above all.
AUTO_WEIGHT_DECAY = ((10_000, 0.002), (100_000, 0.0005), (None, 0.0001))


def auto_weight_decay(num_images: int) -> float:
    """The paper's weight decay for a training set of `num_images`: 0.002 below 10,000 images,
    0.0005 below 100,000, else 0.0001.

    Example:
        >>> auto_weight_decay(5_000), auto_weight_decay(50_000), auto_weight_decay(500_000)
        (0.002, 0.0005, 0.0001)
    """
    return next(wd for limit, wd in AUTO_WEIGHT_DECAY if limit is None or num_images < limit)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    return config.lr


@dataclass
class Job:
    """What `fit` trains: a module, the parameters it optimises, how to call it, what a checkpoint holds."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    tensors: Callable[[], dict[str, torch.Tensor]]
    norms: list[nn.Module] = field(default_factory=list)


def _optimizer(config: TrainConfig, params: list[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=weight_decay)


def fit(
    job: Job,
    train_set: DomainDataset,
    eval_set: DomainDataset | None,
    config: TrainConfig,
    acc: Accelerator,
    resume: bool | str | Path,
    callback: Callable[[dict[str, Any]], None] | None,
) -> dict[str, float]:
    world, rank = acc.num_processes, acc.process_index
    per_epoch = len(train_set) // (config.batch_size * world) // config.grad_accum  # optimizer steps
    total = config.steps or config.epochs * per_epoch
    wd = auto_weight_decay(len(train_set)) if config.weight_decay == "auto" else float(config.weight_decay)
    folder = Path(config.output_dir) / "checkpoints" / job.name if config.output_dir else None
    if resume not in (False, True):
        folder = Path(resume)
    elif resume and folder is None:
        raise ValueError(
            "resume=True needs TrainConfig(output_dir=...) (checkpoints live in output_dir/checkpoints)"
        )

    module, was_training = job.module.to(acc.device), job.module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)  # DDP then only syncs (and the optimizer only sees) the job's tensors
    for p in job.params:
        p.requires_grad_(True)
    optimizer = _optimizer(config, job.params, wd)
    state = _restore(folder, job, optimizer, config, len(train_set), world) if resume else None
    step, loss_sum = (state["step"], state["loss"]) if state else (0, [0.0, 0])
    patched = {k: module.__dict__[k] for k in ("forward", "_original_forward") if k in module.__dict__}
    wrapped, optimizer = acc.prepare(module, optimizer)
    if state:
        torch.set_rng_state(state["rng"]["torch"][rank])
        if state["rng"].get("cuda") is not None and acc.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank])
        if state.get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
    else:
        torch.manual_seed(config.seed + rank)  # dropout; different per process
    own_trackers = bool(config.log_with) and not acc.trackers
    if own_trackers:
        flat = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()
        }
        acc.init_trackers(f"adapterkit-{job.name}", config=flat | {"weight_decay_used": wd})
    acc.step = 0  # accumulation counter; checkpoints sit on optimizer-step boundaries
    bar = tqdm(
        total=total,
        initial=step,
        desc=job.name,
        unit="step",
        disable=not (config.progress and acc.is_main_process),
    )
    start, window = time.perf_counter(), []
    module.train()
    try:
        while step < total:
            epoch, done = divmod(step, per_epoch)
            if done == 0:
                loss_sum = [0.0, 0]
            sampler = EpochBatches(
                len(train_set),
                config.batch_size,
                seed=config.seed,
                epoch=epoch,
                rank=rank,
                world_size=world,
                start=done * config.grad_accum,
                stop=per_epoch * config.grad_accum,
            )
            # own generator: creating a DataLoader iterator must not draw from the global RNG (resume)
            loader = DataLoader(
                train_set,
                batch_sampler=sampler,
                num_workers=config.num_workers,
                generator=torch.Generator(),
                pin_memory=acc.device.type == "cuda",
            )
            for x, y in loader:
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                with acc.accumulate(wrapped):
                    loss = F.cross_entropy(job.forward(wrapped, x), y, label_smoothing=config.label_smoothing)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        lr = learning_rate(config, step, total)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        if config.max_grad_norm:
                            acc.clip_grad_norm_(job.params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.append(loss.detach().float())
                if not acc.sync_gradients:
                    continue
                step += 1
                step_loss = torch.stack(window).mean().item()
                window.clear()
                loss_sum = [loss_sum[0] + step_loss, loss_sum[1] + 1]
                bar.update(1)
                if step % config.log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
                    acc.log({f"{job.name}/loss": step_loss, f"{job.name}/lr": lr}, step=step)
                if (
                    folder is not None
                    and config.checkpoint_every
                    and step % config.checkpoint_every == 0
                    and step < total
                ):
                    _save(folder, acc, job, optimizer, config, step, len(train_set), loss_sum)
                if callback is not None:
                    callback({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr})
                if step >= total:
                    break
    finally:
        bar.close()
        for key in ("forward", "_original_forward"):  # prepare() wraps forward in autocast: undo it
            module.__dict__.pop(key, None)
        module.__dict__.update(patched)
        _forget(acc, wrapped, optimizer)
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
    seconds = time.perf_counter() - start
    _average_norms(acc, job.norms)
    totals = acc.reduce(torch.tensor(loss_sum, dtype=torch.float64, device=acc.device), "sum")
    metrics = {"steps": float(step), "epochs": step / per_epoch, "weight_decay": wd, "seconds": seconds}
    metrics["train_loss"] = float(totals[0] / max(totals[1], 1))
    if eval_set is not None:
        metrics["accuracy"] = evaluate_dataset(module, job.forward, eval_set, config, acc, f"{job.name} eval")
        acc.log({f"{job.name}/accuracy": metrics["accuracy"]}, step=step)
    if own_trackers:
        for tracker in acc.trackers:
            tracker.finish()
    if folder is not None and acc.is_main_process:
        for f in (*folder.glob("step-*.safetensors"), folder / "checkpoint.json"):
            f.unlink(missing_ok=True)  # the domain is complete: its checkpoint is not needed any more
    return metrics


def evaluate_dataset(
    module: nn.Module,
    forward: Callable,
    dataset: DomainDataset,
    config: TrainConfig,
    acc: Accelerator,
    desc: str | None,
) -> float:
    loader = DataLoader(
        dataset,
        batch_size=config.eval_batch_size or 2 * config.batch_size,
        num_workers=config.num_workers,
        generator=torch.Generator(),
    )
    loader = acc.prepare_data_loader(loader)
    was_training = module.training
    module.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in tqdm(
                loader, desc=desc, leave=False, disable=not (config.progress and acc.is_main_process)
            ):
                with acc.autocast():
                    pred = forward(module, x).argmax(-1)
                pred, y = acc.gather_for_metrics((pred, y))
                correct += int((pred == y).sum())
                total += y.numel()
    finally:
        module.train(was_training)
        _forget(acc, loader)
    return correct / max(total, 1)


def _average_norms(acc: Accelerator, norms: list[nn.Module]) -> None:
    """Average the trained BatchNorm running statistics over processes (each saw its own shard)."""
    if acc.num_processes == 1:
        return
    with torch.no_grad():
        for norm in norms:
            for t in (norm.running_mean, norm.running_var):
                if t is not None:
                    t.copy_(acc.reduce(t.clone(), "mean"))


def _forget(acc: Accelerator, *objects: Any) -> None:
    """Drop the accelerator's references to what this call prepared (it may train many domains)."""
    for registry in (
        getattr(acc, "_models", []),
        getattr(acc, "_optimizers", []),
        getattr(acc, "_dataloaders", []),
    ):
        registry[:] = [o for o in registry if not any(o is obj for obj in objects)]


def _save(
    folder: Path,
    acc: Accelerator,
    job: Job,
    optimizer: Any,
    config: TrainConfig,
    step: int,
    n: int,
    loss: list,
) -> None:
    rng = {"torch": acc.gather(torch.get_rng_state().to(acc.device)[None]).cpu()}
    if acc.device.type == "cuda":
        rng["cuda"] = acc.gather(torch.cuda.get_rng_state().to(acc.device)[None]).cpu()
    if acc.is_main_process:
        state = {
            "domain": job.name,
            "step": step,
            "loss": loss,
            "num_images": n,
            "world_size": acc.num_processes,
            "config": config.trajectory(),
            "tensors": job.tensors(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        save_checkpoint(folder, state, step)
    acc.wait_for_everyone()


def _restore(
    folder: Path | None, job: Job, optimizer: torch.optim.Optimizer, config: TrainConfig, n: int, world: int
) -> dict[str, Any] | None:
    state = load_checkpoint(folder) if folder is not None else None
    if state is None:
        logger.info("no checkpoint in %s: %s starts from step 0", folder, job.name)
        return None
    fix = f"resume with the settings it was written with, or delete {folder} to start afresh"
    ours = config.trajectory()
    diff = sorted(k for k in ours if ours[k] != state["config"].get(k))
    if state["domain"] != job.name or diff:
        raise ValueError(
            f"the checkpoint in {folder} ({state['domain']!r}) differs in {diff or 'domain'}: {fix}"
        )
    if (state["num_images"], state["world_size"]) != (n, world):
        raise ValueError(
            f"the checkpoint in {folder} was written for {state['num_images']} training images on "
            f"{state['world_size']} processes (now {n} on {world}): {fix}"
        )
    live = job.tensors()
    if set(live) != set(state["tensors"]):
        raise ValueError(f"the checkpoint in {folder} holds other tensors than {job.name!r} has: {fix}")
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(state["tensors"][key])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("%s resumes at step %d from %s", job.name, state["step"], folder)
    return state
