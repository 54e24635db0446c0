"""Training machinery shared by detection and segmentation: distributed setup, layer-wise lr decay, an
iteration-based loop with crash-safe training states and exact resume, the task checkpoint format and the train /
load drivers both tasks run (:func:`train_dense_task`, :func:`load_task_model`)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..errors import CheckpointError
from ..files import atomic_json_dump, atomic_torch_save, pyplot, save_figure
from ..train.data import ResumableSampler, SeededSamples, sample_seed
from ..train.distributed import decided_by_main, join_process_group
from ..train.faults import fault_point, trace, tracing
from ..train.state import (
    STATE_FORMAT,
    list_states,
    load_agreed_state,
    remove_partial_states,
    save_state,
    seed_everything,
)
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
            join_process_group("nccl" if use_cuda else "gloo")
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
                         power: float = 1.0, start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1e-3 x lr, then polynomial decay to 0 (``power`` 1: linear), of each group's
    ``initial_lr`` (its lr when first scheduled).

    ``start``: iterations already done (a resumed run). The optimizer's lr is then set to this schedule's at
    ``start``, whatever schedule the resumed state was saved under (e.g. one of fewer iterations).
    """
    def factor(it: int) -> float:
        if it < warmup_iters:
            return 1e-3 + (1 - 1e-3) * it / warmup_iters
        progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return max(0.0, 1 - progress) ** power

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


# -------------------------------------------------------------------------------------------- checkpoints
def task_checkpoint(model: nn.Module, task: str, builder: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The content of a detection/segmentation checkpoint (rebuilt by ``builder``), without its format tag: a
    model file (:func:`save_task_checkpoint`) or, with the optimizer and the run's progress, a training state."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return {"task": task, "builder": dict(builder),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def save_task_checkpoint(path: str | os.PathLike, model: nn.Module, task: str, builder: Mapping[str, Any],
                         **extra: Any) -> Path:
    """Atomically write a self-describing detection/segmentation checkpoint (rebuilt by ``builder``)."""
    return atomic_torch_save({"format": DENSE_FORMAT, **task_checkpoint(model, task, builder, **extra)}, path)


def read_task_checkpoint(path: str | os.PathLike | Mapping[str, Any], task: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_task_checkpoint` for ``task``, or a training state of such a run;
    clear errors otherwise."""
    raw = read_torch_file(path) if isinstance(path, (str, os.PathLike)) else dict(path)
    if not isinstance(raw, dict) or raw.get("format") not in (DENSE_FORMAT, STATE_FORMAT) or "builder" not in raw:
        raise CheckpointError(
            f"{path} is not an fcaformer {task} checkpoint (format {DENSE_FORMAT!r}); for backbone weights "
            "(release classification / mmdet / mmseg) pass them as --backbone-weights to train"
        )
    if raw.get("task") != task:
        raise CheckpointError(f"{path} is a {raw.get('task')} checkpoint, not a {task} one")
    return raw


# --------------------------------------------------------------------------------------------------- loop
class DenseBatches:
    """The training batches of a run from iteration ``start`` on, epoch after epoch.

    The :class:`~fcaformer.train.data.ResumableSampler` continues an epoch where a resumed run stopped, every
    sample is loaded under its own seed (:class:`~fcaformer.train.data.SeededSamples`) and every iteration runs
    under a seed of its position (``seed``, epoch, batch), so a resumed run trains on the batches, augmentations and
    random draws (drop path, RoI sampling) of an uninterrupted one. ``epoch`` and ``batch`` are those of the batch
    last yielded.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler, seed: int, start: int = 0) -> None:
        self.loader, self.sampler, self.seed = loader, sampler, seed
        self.per_epoch = sampler.batches_per_epoch()
        self.epoch, self.batch = divmod(start, self.per_epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch, first = self.epoch, self.batch
        while True:
            self.sampler.set_epoch(epoch, first)
            for index, batch in enumerate(self.loader, start=first):
                self.epoch, self.batch = epoch, index
                seed_everything(sample_seed(self.seed, epoch, index))
                yield batch
            epoch, first = epoch + 1, 0


@dataclass
class RunHistory:
    """The record of a whole run, kept in the training states so that it survives resumes: the loss and lr of every
    iteration (``losses[i]`` belongs to iteration ``i + 1``), the validation results (``evals``: ``iteration``
    plus scalar metrics) and the iterations at which the run was resumed."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)


def train_iterations(
    model: nn.Module,
    batches: Iterable[Any],
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
    """Run iterations ``start_iteration .. iterations - 1`` on the next batches of ``batches``.

    ``loss_fn(model, batch)`` returns named losses (summed for the step). ``after_step(i)`` is called after
    each iteration (``i`` = iterations done; checkpoints, validation). Each loss and lr is also appended to
    ``history`` when given.
    """
    model.train()
    batches = iter(batches)
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


def restore_state(state: Mapping[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  task: str, builder: Mapping[str, Any], lr: float) -> tuple[int, RunHistory]:
    """Load a training state into model and optimizer; returns the iterations already done and the run's history.

    A state of another task or model is refused before anything is loaded. Each parameter group's base lr is set
    from ``lr`` (the schedule is the resuming run's: see :func:`warmup_poly_schedule`'s ``start``).
    """
    if state.get("task") != task:
        raise CheckpointError(f"{path} is a training state of a {state.get('task')} run, not a {task} one")
    if _canonical(state["builder"]) != _canonical(builder):
        changed = sorted(k for k in {*state["builder"], *builder}
                         if _canonical(state["builder"].get(k)) != _canonical(builder.get(k)))
        raise CheckpointError(f"cannot resume {path}: it was trained with other model settings ({', '.join(changed)}"
                              " differ); resume with the run's settings, or start a new run in another --out")
    target = model.module if isinstance(model, DistributedDataParallel) else model
    target.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["initial_lr"] = lr * group["lr_scale"]
    done = int(state["iteration"])
    history = RunHistory(**state["history"])
    history.resumed_at.append(done)
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


AUTO = "auto"
"""``resume="auto"`` (``--resume auto``): continue the run's newest good state if it has one, else start it."""


@dataclass(kw_only=True)
class DenseTrainConfig:
    """The training knobs shared by ``DetectTrainConfig`` and ``SegmentTrainConfig`` (which add their data and
    model fields; all are stored whole in the checkpoints) and read by :func:`train_dense_task`.

    ``warmup_iters=None`` warms up for ``min(50, iterations // 10)`` iterations; ``eval_every`` > 0 also
    validates every so many iterations (always after the last one, when there is a validation set);
    ``min_usable`` is the smallest fraction of the data that must survive the data checks. A training state is
    written every ``checkpoint_every`` iterations and whenever ``checkpoint_minutes`` have passed since the last
    one (0: off), the newest ``keep_checkpoints`` kept. ``resume``: ``False`` starts a new run, ``True``
    continues the run in ``out_dir`` (an error if it has no state), ``"auto"`` continues it if it has a state
    and else starts it.
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
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    eval_every: int = 0
    resume: bool | str = False
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
    if config.resume not in (False, True, AUTO):
        raise ValueError(f"--resume takes no value or 'auto', got {config.resume!r}")
    if config.checkpoint_minutes < 0:
        raise ValueError(f"--checkpoint-minutes must be >= 0 (0: off), got {config.checkpoint_minutes}")
    if config.keep_checkpoints < 2:
        raise ValueError(f"--keep-checkpoints must be at least 2 (a corrupt newest state falls back to the one "
                         f"before), got {config.keep_checkpoints}")


def warmup_length(config: DenseTrainConfig) -> int:
    """The warm-up of ``config``; ``ValueError`` when it would not end before training does."""
    if config.warmup_iters is None:
        return min(DEFAULT_WARMUP, config.iterations // 10)
    if not 0 <= config.warmup_iters < config.iterations:
        raise ValueError(f"--warmup-iters {config.warmup_iters} must be below --iterations {config.iterations}, or "
                         "the lr never leaves warm-up; lower it (or leave it out: min(50, iterations / 10))")
    return config.warmup_iters


def _resumable_state(config: DenseTrainConfig, info: DistInfo,
                     logger: logging.Logger) -> tuple[dict[str, Any], Path] | None:
    """The state a run continues from (the same on every rank), or ``None`` for a new run. A new run in a folder
    with states of an earlier run removes them (so that no later resume picks one of them up)."""
    out_dir = Path(config.out_dir)
    states = out_dir / "checkpoints"
    found = load_agreed_state(out_dir) if config.resume else None
    if config.resume is True and found is None:  # a typo in --out must not start a new run
        where = f"{out_dir} has no training state (checkpoints/state-*.pt)" if out_dir.is_dir() \
            else f"{out_dir} does not exist"
        raise FileNotFoundError(f"--resume: nothing to resume, {where}; check --out, or leave out --resume to "
                                "start a new run")
    if found is None and info.is_main:
        if config.resume == AUTO:
            logger.info("--resume auto: no training state in %s; starting a new run", states)
        old = list_states(states)
        if old:
            logger.warning("starting a new run in %s: removing the %d training states of an earlier run (--resume "
                           "continues a run instead)", out_dir, len(old))
            for path in old:
                path.unlink(missing_ok=True)
    return found


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
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a detection / segmentation model; writes training states (``checkpoints/state-<iteration>.pt``,
    resumable), ``model.pt``, ``train_log.json`` and ``curves.png`` into ``config.out_dir``.

    The task supplies its pieces: ``make_dataset()`` the training set; ``builder_for(dataset)`` the keyword
    arguments of ``build_model`` stored in the checkpoints (``backbone_weights`` is added only for the first
    build); ``trunk_of(model)`` the backbone trunk that gets layer-wise lr decay; ``meta_for(dataset)`` extra
    checkpoint entries (``config`` is added); ``loss_fn`` and ``collate_fn`` for :func:`train_iterations`;
    ``evaluate(model)`` the validation metrics (``None``: no validation set), of which ``metric_names`` are
    plotted; ``describe`` the input size etc. for the start-up summary, ``cpu_advice`` a warning logged when
    the run trains on a CPU. ``drop_last`` drops the ragged last batch of each epoch, but only while the
    dataset fills a batch on every rank.

    Each epoch every rank trains on its shard of a shuffle of the dataset (``len(dataset) mod world size`` images
    sit that epoch out). A resumed run continues mid-epoch with exactly the batches, augmentations and random
    draws of an uninterrupted run (see :class:`DenseBatches`), and the lr of the resumed run's own schedule.
    Samples that fail to load are skipped (the next one takes their place), logged once each and counted; the
    run stops when more than ``1 - config.min_usable`` of the dataset fails. ``resume=True`` of a folder without
    a state is an error (``FileNotFoundError``), and the log, the curves and the returned losses cover the
    whole run across resumes.

    Returns ``{"losses": [...all iterations...], "start_iteration": n, "metrics": {...} (with ``evaluate``),
    "skipped": {...}, "checkpoint": path, "log": path, "curves": path}``. Under torchrun each rank trains on
    its shard (DDP, gloo on CPU); rank 0 writes files and evaluates, and every rank resumes from the state rank
    0 chose.
    """
    task_log = logging.getLogger(f"fcaformer.{task}.training")  # messages under the task the user ran
    out_dir = Path(config.out_dir)
    check_config(config)
    warmup = warmup_length(config)
    info = setup_distributed(config.device)
    seed_everything(config.seed + info.rank)
    try:
        found = _resumable_state(config, info, task_log)  # before any slow set-up
        dataset = make_dataset()
        builder = builder_for(dataset)
        model = build_model(**builder, backbone_weights=None if found else config.backbone_weights).to(info.device)
        optimizer = build_optimizer(model, trunk_of(model), config.lr, config.weight_decay, config.layer_decay)
        start, history = 0, RunHistory()
        if found is not None:
            state, path = found
            start, history = restore_state(state, path, model, optimizer, task, builder, config.lr)
            # --resume auto of a finished run only writes its model file again (a restart after the last state)
            if start > config.iterations or (start == config.iterations and config.resume is True):
                raise ValueError(f"--resume: {path} has already done {start} iterations; raise --iterations above "
                                 "that to train on")
        scheduler = warmup_poly_schedule(optimizer, config.iterations, warmup, start=start)
        model = wrap_ddp(model, info)
        meta = {**meta_for(dataset), "config": asdict(config)}  # type: ignore[call-overload]
        core = model.module if isinstance(model, DistributedDataParallel) else model
        listed = getattr(dataset, "listed", len(dataset))  # before the data checks dropped any
        failures = LoadFailures(listed, config.min_usable, task_log, scan_skipped=listed - len(dataset))
        scan_skips = {reason: list(details) for reason, details in getattr(dataset, "skip_details", {}).items()}
        result: dict[str, Any] = {"start_iteration": start, "checkpoint": str(out_dir / "model.pt"),
                                  "log": str(out_dir / "train_log.json"), "curves": str(out_dir / "curves.png")}
        if found is not None:
            result["metrics"] = found[0].get("metrics")
        title = f"{task}: {config.variant}, {config.iterations} iterations"

        per_rank = len(dataset) // info.world_size
        if per_rank == 0:
            raise ValueError(f"{len(dataset)} training images for {info.world_size} processes: each process needs "
                             "at least one; use fewer processes")
        sampler = ResumableSampler(dataset, config.batch_size, rank=info.rank, world_size=info.world_size,
                                   seed=config.seed, drop_last=drop_last and per_rank >= config.batch_size)
        loader = DataLoader(SeededSamples(SkipUnloadable(dataset, substitute=True)), batch_size=config.batch_size,
                            sampler=sampler, num_workers=config.workers, collate_fn=SkippingCollate(collate_fn),
                            persistent_workers=config.workers > 0)
        batches = DenseBatches(loader, sampler, config.seed + 7_777 * info.rank, start)
        last_state = time.monotonic()

        def write_record(done: int) -> None:
            skipped = {"when_scanned": scan_skips, "when_loaded": failures.messages}
            result["skipped"] = skipped
            atomic_json_dump({"task": task, "iterations": done, "resumed_at": history.resumed_at,
                              "losses": history.losses, "lrs": history.lrs, "evals": history.evals,
                              "metrics": result.get("metrics"), "skipped": skipped}, result["log"])
            plot_run(history, result["curves"], metric_names, title)

        def state_due(done: int) -> bool:
            """The same answer on every rank: the time is rank 0's."""
            if done == config.iterations or (config.checkpoint_every and done % config.checkpoint_every == 0):
                return True
            return bool(config.checkpoint_minutes) and decided_by_main(
                time.monotonic() - last_state >= 60 * config.checkpoint_minutes, info.device)

        def after_step(done: int) -> None:
            nonlocal last_state
            if tracing():
                trace("batch", position=done - 1, epoch=batches.epoch, batch=batches.batch, step=done,
                      samples=sampler.batch_indices(batches.batch))
            final = done == config.iterations
            if evaluate is not None and info.is_main and (final or (config.eval_every and
                                                                     done % config.eval_every == 0)):
                trace("eval", phase="start", position=done)
                fault_point("eval")
                metrics = evaluate(core)
                trace("eval", phase="end", position=done)
                core.train()
                history.evals.append({"iteration": done, **{k: v for k, v in metrics.items()
                                                            if isinstance(v, (int, float))}})
                result["metrics"] = metrics
                task_log.info("validation at iteration %d: %s", done,
                              ", ".join(f"{k} {metrics[k]:.4f}" for k in metric_names if k in metrics))
            if state_due(done):
                if info.is_main:
                    save_state(out_dir / "checkpoints", done,
                               task_checkpoint(model, task, builder, optimizer=optimizer.state_dict(),
                                               iteration=done, history=asdict(history),
                                               metrics=result.get("metrics"), **meta),
                               keep=config.keep_checkpoints)
                    write_record(done)
                last_state = time.monotonic()

        if info.is_main:
            remove_partial_states(out_dir / "checkpoints")  # temporary files of writes a kill interrupted
            if found is not None:
                task_log.info("resumed from %s at iteration %d (epoch %d, batch %d of %d)", found[1], start,
                              batches.epoch + 1, batches.batch, batches.per_epoch)
            task_log.info("training %s (%s) on %s: iterations %d-%d, batch %d x %d process(es), lr %g, warm-up %d, "
                          "%d training images; writing to %s", config.variant, describe or task, info.device,
                          start + 1, config.iterations, config.batch_size, info.world_size, config.lr, warmup,
                          len(dataset), out_dir)
            if cpu_advice and info.device.type == "cpu":
                task_log.warning(cpu_advice)
        trace("start", position=start, step=start, world_size=info.world_size)
        train_iterations(model, batches, loss_skipping(loss_fn, failures), optimizer, scheduler,
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
