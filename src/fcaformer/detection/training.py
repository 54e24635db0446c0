"""Training machinery shared by detection and segmentation: distributed setup, layer-wise lr decay, an
iteration-based loop with crash-safe checkpoints and resume, the task checkpoint format and the train / load
drivers both tasks run (:func:`train_dense_task`, :func:`load_task_model`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..checkpoint import CheckpointError, read_checkpoint
from ..io import atomic_json_dump, atomic_torch_save

log = logging.getLogger(__name__)

DENSE_FORMAT = "fcaformer-dense-v1"
"""``format`` tag of detection / segmentation checkpoints written by this package."""


# ----------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and device of this process (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        return DistInfo(rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))
    return DistInfo(0, 1, torch.device(device or ("cuda" if use_cuda else "cpu")))


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap when distributed; unused parameters are allowed (e.g. no positive RoIs in a batch)."""
    if info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def make_loader(dataset: Any, batch_size: int, info: DistInfo, workers: int, collate_fn: Callable | None,
                shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A loader that shards over ranks under DDP (``DistributedSampler``)."""
    sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=shuffle, seed=seed) \
        if info.world_size > 1 else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, drop_last=drop_last, generator=generator,
                      persistent_workers=workers > 0)


# ------------------------------------------------------------------------------------------------ optimizer
def layer_decay_param_groups(
    model: nn.Module, trunk: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.95
) -> list[dict[str, Any]]:
    """AdamW parameter groups: the trunk's by timm's ``param_groups_layer_decay`` (through the model's
    ``group_matcher``: stem lowest, then each block), every other parameter (FPN, heads, decoder) at scale 1.

    Each group has ``lr_scale``; :func:`build_optimizer` multiplies it into the lr. Biases and norms
    (1-D tensors) and the trunk's ``no_weight_decay`` parameters get no weight decay.
    """
    trunk_groups = param_groups_layer_decay(
        trunk, weight_decay=weight_decay, no_weight_decay_list=getattr(trunk, "no_weight_decay", set)(),
        layer_decay=layer_decay)
    trunk_ids = {id(p) for p in trunk.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in trunk_ids:
            (no_decay if param.ndim <= 1 else decay).append(param)
    rest = [dict(params=decay, weight_decay=weight_decay, lr_scale=1.0),
            dict(params=no_decay, weight_decay=0.0, lr_scale=1.0)]
    return [g for g in [*trunk_groups, *rest] if g["params"]]


def build_optimizer(model: nn.Module, trunk: nn.Module, lr: float, weight_decay: float,
                    layer_decay: float) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay (the release used 0.95 for its dense tasks)."""
    groups = layer_decay_param_groups(model, trunk, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def warmup_poly_schedule(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int,
                         power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1e-3 x lr, then polynomial decay to 0 (``power`` 1: linear)."""
    def factor(it: int) -> float:
        if it < warmup_iters:
            return 1e-3 + (1 - 1e-3) * it / warmup_iters
        progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return max(0.0, 1 - progress) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -------------------------------------------------------------------------------------------- checkpoints
def save_task_checkpoint(path: str | os.PathLike, model: nn.Module, task: str, builder: Mapping[str, Any],
                         **extra: Any) -> Path:
    """Atomically write a self-describing detection/segmentation checkpoint (rebuilt by ``builder``)."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return atomic_torch_save({
        "format": DENSE_FORMAT,
        "task": task,
        "builder": dict(builder),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }, path)


def read_task_checkpoint(path: str | os.PathLike | Mapping[str, Any], task: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_task_checkpoint` for ``task``; clear errors otherwise."""
    raw = read_checkpoint(path) if isinstance(path, (str, os.PathLike)) else dict(path)
    if not isinstance(raw, dict) or raw.get("format") != DENSE_FORMAT:
        raise CheckpointError(
            f"{path} is not an fcaformer {task} checkpoint (format {DENSE_FORMAT!r}); for backbone weights "
            "(release classification / mmdet / mmseg) pass them as --backbone-weights to train"
        )
    if raw.get("task") != task:
        raise CheckpointError(f"{path} is a {raw.get('task')} checkpoint, not a {task} one")
    return raw


# --------------------------------------------------------------------------------------------------- loop
def _cycle(loader: DataLoader) -> Iterator[Any]:
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_iterations(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    iterations: int,
    start_iteration: int = 0,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    clip_grad: float | None = None,
    show_progress: bool = True,
) -> list[float]:
    """Run iterations ``start_iteration .. iterations - 1``; returns the total loss of each.

    ``loss_fn(model, batch)`` returns named losses (summed for the step). ``checkpoint(i)`` is called every
    ``checkpoint_every`` iterations and after the last one (``i`` = iterations done).
    """
    model.train()
    batches = _cycle(loader)
    history: list[float] = []
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations,
               disable=not show_progress, desc="train", dynamic_ncols=True)
    for it in bar:
        losses = loss_fn(model, next(batches))
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            named = {k: v.item() for k, v in losses.items()}
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it} ({named}); lower the lr or check "
                                     "the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
        done = it + 1
        periodic = checkpoint_every and done % checkpoint_every == 0
        if checkpoint is not None and (periodic or done == iterations):
            checkpoint(done)
    return history


def resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, task: str) -> int:
    """Restore model, optimizer and schedule from a ``last.pt``; returns the iterations already done."""
    raw = read_task_checkpoint(path, task)
    target = model.module if isinstance(model, DistributedDataParallel) else model
    target.load_state_dict(raw["state_dict"])
    if "optimizer" not in raw:
        raise CheckpointError(f"{path} has no optimizer state (a final model checkpoint?); cannot resume")
    optimizer.load_state_dict(raw["optimizer"])
    scheduler.load_state_dict(raw["scheduler"])
    log.info("resumed from %s at iteration %d", path, raw["iteration"])
    return int(raw["iteration"])


# ------------------------------------------------------------------------------------------------- drivers
@dataclass(kw_only=True)
class DenseTrainConfig:
    """The training knobs shared by ``DetectTrainConfig`` and ``SegmentTrainConfig`` (which add their data and
    model fields; all are stored whole in the checkpoints) and read by :func:`train_dense_task`."""

    out_dir: str
    variant: str = "fcaformer_l2"
    backbone_mode: str = "windowed"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    iterations: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.95
    warmup_iters: int = 50
    clip_grad: float | None = None
    checkpoint_every: int = 100
    resume: bool = False
    workers: int = 2
    seed: int = 0
    device: str | None = None


def train_dense_task(
    config: DenseTrainConfig,
    task: str,
    *,
    make_dataset: Callable[[], Any],
    builder_for: Callable[[Any], dict[str, Any]],
    build_model: Callable[..., nn.Module],
    trunk_of: Callable[[nn.Module], nn.Module],
    meta_for: Callable[[Any], dict[str, Any]],
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    collate_fn: Callable | None = None,
    drop_last: bool = False,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    seeders: Sequence[Callable[[int], Any]] = (torch.manual_seed,),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a detection / segmentation model; writes ``last.pt`` (resumable), ``model.pt`` and
    ``train_log.json`` into ``config.out_dir``.

    The task supplies its pieces: ``make_dataset()`` the training set; ``builder_for(dataset)`` the keyword
    arguments of ``build_model`` stored in the checkpoints (``backbone_weights`` is added only for the first
    build); ``trunk_of(model)`` the backbone trunk that gets layer-wise lr decay; ``meta_for(dataset)`` extra
    checkpoint entries (``config`` is added); ``loss_fn`` and ``collate_fn`` for :func:`train_iterations`;
    ``evaluate(model)`` the validation metrics (``None``: no validation set). ``drop_last`` drops the ragged
    last batch, but only while the dataset fills a batch on every rank. Each of ``seeders`` is called with
    ``config.seed + rank``.

    Returns ``{"losses": [...], "metrics": {...} (with ``evaluate``), "checkpoint": path}``. Under torchrun
    each rank trains on its shard (DDP, gloo on CPU); rank 0 writes files and evaluates.
    """
    info = setup_distributed(config.device)
    for seed in seeders:
        seed(config.seed + info.rank)
    out_dir = Path(config.out_dir)
    try:
        dataset = make_dataset()
        builder = builder_for(dataset)
        model = build_model(**builder, backbone_weights=config.backbone_weights).to(info.device)
        optimizer = build_optimizer(model, trunk_of(model), config.lr, config.weight_decay, config.layer_decay)
        scheduler = warmup_poly_schedule(optimizer, config.iterations, config.warmup_iters)
        model = wrap_ddp(model, info)
        start = 0
        last = out_dir / "last.pt"
        if config.resume and last.exists():
            start = resume_state(last, model, optimizer, scheduler, task)
        elif config.resume:
            log.warning("--resume: %s does not exist yet; starting from scratch", last)
        meta = {**meta_for(dataset), "config": asdict(config)}  # type: ignore[call-overload]

        def checkpoint(done: int) -> None:
            if info.is_main:
                save_task_checkpoint(last, model, task, builder, optimizer=optimizer.state_dict(),
                                     scheduler=scheduler.state_dict(), iteration=done, **meta)

        loader = make_loader(dataset, config.batch_size, info, config.workers, collate_fn, shuffle=True,
                             seed=config.seed,
                             drop_last=drop_last and len(dataset) >= config.batch_size * info.world_size)
        losses = train_iterations(model, loader, loss_fn, optimizer, scheduler,
                                  iterations=config.iterations, start_iteration=start, checkpoint=checkpoint,
                                  checkpoint_every=config.checkpoint_every, clip_grad=config.clip_grad,
                                  show_progress=show_progress and info.is_main)
        result: dict[str, Any] = {"losses": losses, "checkpoint": str(out_dir / "model.pt")}
        if info.is_main:
            core = model.module if hasattr(model, "module") else model
            if evaluate is not None:
                result["metrics"] = evaluate(core)
            save_task_checkpoint(out_dir / "model.pt", core, task, builder, iteration=config.iterations,
                                 metrics=result.get("metrics"), **meta)
            atomic_json_dump({"losses": losses, "metrics": result.get("metrics")}, out_dir / "train_log.json")
        return result
    finally:
        cleanup_distributed()


def load_task_model(path: str | os.PathLike | Mapping[str, Any], task: str, build_model: Callable[..., nn.Module],
                    device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a :func:`train_dense_task` checkpoint of ``task``; returns ``(model in eval mode,
    raw checkpoint)``."""
    raw = read_task_checkpoint(path, task)
    model = build_model(**raw["builder"])
    model.load_state_dict(raw["state_dict"])
    return model.to(device).eval(), raw
