"""Training machinery shared by detection and segmentation: distributed setup, layer-wise lr decay, an
iteration-based loop with crash-safe checkpoints and resume, the task checkpoint format and the train / load
drivers both tasks run (:func:`train_dense_task`, :func:`load_task_model`)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..errors import CheckpointError
from ..files import atomic_json_dump, atomic_torch_save, pyplot, save_figure
from ..weights.reading import read_torch_file
from .inputs import LoadFailures, SkippingCollate, SkipUnloadable, loss_skipping

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
    raw = read_torch_file(path) if isinstance(path, (str, os.PathLike)) else dict(path)
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


@dataclass
class RunHistory:
    """The record of a whole run, kept in ``last.pt`` so that it survives resumes: the loss and lr of every
    iteration (``losses[i]`` belongs to iteration ``i + 1``), the validation results (``evals``: ``iteration``
    plus scalar metrics) and the iterations at which the run was resumed."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)


def train_iterations(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    iterations: int,
    start_iteration: int = 0,
    after_step: Callable[[int], None] | None = None,
    clip_grad: float | None = None,
    show_progress: bool = True,
    history: RunHistory | None = None,
) -> None:
    """Run iterations ``start_iteration .. iterations - 1``.

    ``loss_fn(model, batch)`` returns named losses (summed for the step). ``after_step(i)`` is called after
    each iteration (``i`` = iterations done; checkpoints, validation). Each loss and lr is also appended to
    ``history`` when given.
    """
    model.train()
    batches = _cycle(loader)
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations,
               disable=not show_progress, desc="train", dynamic_ncols=True)
    for it in bar:
        losses = loss_fn(model, next(batches))
        loss = sum(losses.values())
        value = loss.item()  # one device sync per step
        if not math.isfinite(value):
            named = {k: v.item() for k, v in losses.items()}
            raise FloatingPointError(f"loss is {value} at iteration {it} ({named}); lower the lr or check "
                                     "the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        lr = optimizer.param_groups[-1]["lr"]  # the lr of this step (the scheduler moves it on below)
        optimizer.step()
        scheduler.step()
        if history is not None:
            history.losses.append(value)
            history.lrs.append(lr)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
        if after_step is not None:
            after_step(it + 1)


def resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, task: str,
                 builder: Mapping[str, Any] | None = None, logger: logging.Logger = log) -> tuple[int, RunHistory]:
    """Restore model, optimizer and schedule from a ``last.pt``; returns the iterations already done and the
    run's history. With ``builder``, a checkpoint of another model is refused before anything is loaded."""
    raw = read_task_checkpoint(path, task)
    if "optimizer" not in raw:
        raise CheckpointError(f"{path} has no optimizer state (a final model checkpoint?); cannot resume")
    if builder is not None and _canonical(raw["builder"]) != _canonical(builder):
        changed = sorted(k for k in {*raw["builder"], *builder}
                         if _canonical(raw["builder"].get(k)) != _canonical(builder.get(k)))
        raise CheckpointError(f"cannot resume {path}: it was trained with other model settings ({', '.join(changed)}"
                              " differ); resume with the run's settings, or start a new run in another --out")
    target = model.module if isinstance(model, DistributedDataParallel) else model
    target.load_state_dict(raw["state_dict"])
    optimizer.load_state_dict(raw["optimizer"])
    scheduler.load_state_dict(raw["scheduler"])
    done = int(raw["iteration"])
    history = RunHistory(**raw["history"]) if "history" in raw else RunHistory()
    if len(history.losses) != done:  # a checkpoint from before run histories were kept
        logger.warning("%s holds no loss history for iterations 1-%d; the run's log starts at the resume", path,
                       done)
        history = RunHistory(losses=[math.nan] * done, lrs=[math.nan] * done)
    history.resumed_at.append(done)
    logger.info("resumed from %s at iteration %d", path, done)
    return done, history


def _canonical(value: Any) -> str:
    """A comparable form of builder arguments (tuples and lists alike, as a checkpoint may hold either)."""
    return json.dumps(value, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------- run record
def plot_run(history: RunHistory, path: str | os.PathLike, metric_names: Sequence[str] = (),
             title: str = "") -> Path:
    """Three panels against the iteration: the loss (each iteration and a running mean), the lr, and the
    validation metrics ``metric_names`` of ``history.evals``; resumes are marked. Written atomically (PNG)."""
    plt = pyplot()
    steps = np.arange(1, len(history.losses) + 1)
    losses = np.asarray(history.losses, dtype=float)
    fig, (ax_loss, ax_lr, ax_metric) = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    window = max(1, len(losses) // 50)
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, lw=0.8, label="each iteration")
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of {window}")
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="training loss")
    ax_loss.legend(loc="upper right")
    ax_lr.plot(steps, history.lrs, color="tab:orange")
    ax_lr.set(xlabel="iteration", ylabel="lr", title="learning rate (head)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    best = 0.0
    for name in metric_names:
        points = [(e["iteration"], e[name]) for e in history.evals if isinstance(e.get(name), (int, float))]
        if points:
            ax_metric.plot(*zip(*points), "o-", label=name)
            best = max(best, *(v for _, v in points))
    if best or history.evals:
        ax_metric.legend(loc="upper left")
        ax_metric.set_ylim(0, max(0.05, 1.1 * best))  # a run from scratch sits near 0: keep that visible
    else:
        ax_metric.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax_metric.transAxes)
    ax_metric.set(xlabel="iteration", title="validation")
    for ax in (ax_loss, ax_lr, ax_metric):
        for resumed in history.resumed_at:
            ax.axvline(resumed, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    if history.losses:
        ax_metric.set_xlim(0, len(history.losses) + 1)
    if title:
        fig.suptitle(title + (f" (resumed at {', '.join(map(str, history.resumed_at))})"
                              if history.resumed_at else ""))
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- drivers
DEFAULT_WARMUP = 50
"""Warm-up iterations when ``warmup_iters`` is not given (capped at a tenth of the run)."""


@dataclass(kw_only=True)
class DenseTrainConfig:
    """The training knobs shared by ``DetectTrainConfig`` and ``SegmentTrainConfig`` (which add their data and
    model fields; all are stored whole in the checkpoints) and read by :func:`train_dense_task`.

    ``warmup_iters=None`` warms up for ``min(50, iterations // 10)`` iterations; ``eval_every`` > 0 also
    validates every so many iterations (always after the last one, when there is a validation set);
    ``min_usable`` is the smallest fraction of the data that must survive the data checks.
    """

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
    warmup_iters: int | None = None
    clip_grad: float | None = None
    checkpoint_every: int = 100
    eval_every: int = 0
    resume: bool = False
    workers: int = 2
    seed: int = 0
    device: str | None = None
    min_usable: float = 0.5


def check_config(config: DenseTrainConfig) -> None:
    """``ValueError`` naming the option for values no run can use."""
    if config.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {config.iterations}")
    if not 0.0 <= config.min_usable <= 1.0:
        raise ValueError(f"--min-usable is a fraction in [0, 1], got {config.min_usable}")


def warmup_length(config: DenseTrainConfig) -> int:
    """The warm-up of ``config``; ``ValueError`` when it would not end before training does."""
    if config.warmup_iters is None:
        return min(DEFAULT_WARMUP, config.iterations // 10)
    if not 0 <= config.warmup_iters < config.iterations:
        raise ValueError(f"--warmup-iters {config.warmup_iters} must be below --iterations {config.iterations}, or "
                         "the lr never leaves warm-up; lower it (or leave it out: min(50, iterations / 10))")
    return config.warmup_iters


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
    metric_names: Sequence[str] = (),
    describe: str = "",
    cpu_advice: str | None = None,
    seeders: Sequence[Callable[[int], Any]] = (torch.manual_seed,),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a detection / segmentation model; writes ``last.pt`` (resumable), ``model.pt``,
    ``train_log.json`` and ``curves.png`` into ``config.out_dir``.

    The task supplies its pieces: ``make_dataset()`` the training set; ``builder_for(dataset)`` the keyword
    arguments of ``build_model`` stored in the checkpoints (``backbone_weights`` is added only for the first
    build); ``trunk_of(model)`` the backbone trunk that gets layer-wise lr decay; ``meta_for(dataset)`` extra
    checkpoint entries (``config`` is added); ``loss_fn`` and ``collate_fn`` for :func:`train_iterations`;
    ``evaluate(model)`` the validation metrics (``None``: no validation set), of which ``metric_names`` are
    plotted; ``describe`` the input size etc. for the start-up summary, ``cpu_advice`` a warning logged when
    the run trains on a CPU. ``drop_last`` drops the ragged last batch, but only while the dataset fills a
    batch on every rank. Each of ``seeders`` is called with ``config.seed + rank``.

    Samples that fail to load are skipped (the next one takes their place), logged once each and counted; the
    run stops when more than ``1 - config.min_usable`` of the dataset fails. ``--resume`` of a folder without
    ``last.pt`` is an error (``FileNotFoundError``), and the log, the curves and the returned losses cover the
    whole run across resumes.

    Returns ``{"losses": [...all iterations...], "start_iteration": n, "metrics": {...} (with ``evaluate``),
    "skipped": {...}, "checkpoint": path, "log": path, "curves": path}``. Under torchrun each rank trains on
    its shard (DDP, gloo on CPU); rank 0 writes files and evaluates.
    """
    task_log = logging.getLogger(f"fcaformer.{task}.training")  # messages under the task the user ran
    out_dir = Path(config.out_dir)
    last = out_dir / "last.pt"
    if config.resume and not last.exists():  # before any slow set-up: a typo in --out must not start a new run
        where = f"{out_dir} has no last.pt" if out_dir.is_dir() else f"{out_dir} does not exist"
        raise FileNotFoundError(f"--resume: nothing to resume, {where}; check --out, or leave out --resume to "
                                "start a new run")
    check_config(config)
    warmup = warmup_length(config)
    info = setup_distributed(config.device)
    for seed in seeders:
        seed(config.seed + info.rank)
    try:
        dataset = make_dataset()
        builder = builder_for(dataset)
        model = build_model(**builder, backbone_weights=config.backbone_weights).to(info.device)
        optimizer = build_optimizer(model, trunk_of(model), config.lr, config.weight_decay, config.layer_decay)
        scheduler = warmup_poly_schedule(optimizer, config.iterations, warmup)
        model = wrap_ddp(model, info)
        start, history = 0, RunHistory()
        if config.resume:
            start, history = resume_state(last, model, optimizer, scheduler, task, builder, task_log)
            if start >= config.iterations:
                raise ValueError(f"--resume: {last} has already done {start} iterations; raise --iterations above "
                                 "that to train on")
        meta = {**meta_for(dataset), "config": asdict(config)}  # type: ignore[call-overload]
        core = model.module if isinstance(model, DistributedDataParallel) else model
        listed = getattr(dataset, "listed", len(dataset))  # before the data checks dropped any
        failures = LoadFailures(listed, config.min_usable, task_log, scan_skipped=listed - len(dataset))
        scan_skips = {reason: list(details) for reason, details in getattr(dataset, "skip_details", {}).items()}
        result: dict[str, Any] = {"start_iteration": start, "checkpoint": str(out_dir / "model.pt"),
                                  "log": str(out_dir / "train_log.json"), "curves": str(out_dir / "curves.png")}
        title = f"{task}: {config.variant}, {config.iterations} iterations"

        def write_record(done: int) -> None:
            skipped = {"when_scanned": scan_skips, "when_loaded": failures.messages}
            result["skipped"] = skipped
            atomic_json_dump({"task": task, "iterations": done, "resumed_at": history.resumed_at,
                              "losses": history.losses, "lrs": history.lrs, "evals": history.evals,
                              "metrics": result.get("metrics"), "skipped": skipped}, result["log"])
            plot_run(history, result["curves"], metric_names, title)

        def after_step(done: int) -> None:
            final = done == config.iterations
            if evaluate is not None and info.is_main and (final or (config.eval_every and
                                                                     done % config.eval_every == 0)):
                metrics = evaluate(core)
                core.train()
                history.evals.append({"iteration": done, **{k: v for k, v in metrics.items()
                                                            if isinstance(v, (int, float))}})
                result["metrics"] = metrics
                task_log.info("validation at iteration %d: %s", done,
                         ", ".join(f"{k} {metrics[k]:.4f}" for k in metric_names if k in metrics))
            if info.is_main and (final or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                save_task_checkpoint(last, model, task, builder, optimizer=optimizer.state_dict(),
                                     scheduler=scheduler.state_dict(), iteration=done, history=asdict(history),
                                     **meta)
                write_record(done)

        loader = make_loader(SkipUnloadable(dataset, substitute=True), config.batch_size, info, config.workers,
                             SkippingCollate(collate_fn), shuffle=True, seed=config.seed,
                             drop_last=drop_last and len(dataset) >= config.batch_size * info.world_size)
        if info.is_main:
            task_log.info("training %s (%s) on %s: iterations %d-%d, batch %d x %d process(es), lr %g, warm-up %d, "
                     "%d training images; writing to %s", config.variant, describe or task, info.device, start + 1,
                     config.iterations, config.batch_size, info.world_size, config.lr, warmup, len(dataset),
                     out_dir)
            if cpu_advice and info.device.type == "cpu":
                task_log.warning(cpu_advice)
        train_iterations(model, loader, loss_skipping(loss_fn, failures), optimizer, scheduler,
                         iterations=config.iterations, start_iteration=start, after_step=after_step,
                         clip_grad=config.clip_grad, show_progress=show_progress and info.is_main, history=history)
        result["losses"] = history.losses
        if info.is_main:
            save_task_checkpoint(out_dir / "model.pt", core, task, builder, iteration=config.iterations,
                                 metrics=result.get("metrics"), **meta)
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
