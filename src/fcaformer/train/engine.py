"""The training loop: timm optimizer/scheduler/Mixup/EMA, DDP, AMP, accumulation, crash-safe checkpoints.

Determinism: every batch runs under a seed derived from (run seed, rank, epoch, batch index) and every sample is
augmented under its own seed (see :mod:`.data`), so a run resumed from a mid-epoch checkpoint reproduces an
uninterrupted run exactly (in deterministic mode, same hardware and thread count).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..fast import fast_attention_modules, set_fast_attention
from ..files import atomic_json_dump, atomic_write, relative_path
from ..models.any_vit import FCA_ENTRY, add_forward_cross_attention, split_switches
from ..models.names import describe_model
from ..profile import count_macs, count_params
from ..weights.pretrained import load_pretrained
from ..weights.project import save_model
from ..weights.record import preprocessing_config
from .config import (
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    apply_mapping,
    check_known_keys,
    config_differences,
    config_from_dict,
    flat_config,
    parse_override,
)
from .data import (
    ImageDataset,
    ImageList,
    ResumableSampler,
    build_transforms,
    eval_loader,
    sample_seed,
    train_loader,
)
from .datasets import load_image_lists
from .device_data import DeviceAugment, DeviceEvalLoader, DeviceSplit, DeviceTrainLoader
from .distributed import (
    DistInfo,
    align_parameter_strides,
    all_true,
    barrier,
    decided_by_main,
    gather_values,
    init_distributed,
    mean_over_ranks,
)
from .evaluate import EvalResult, autocast, evaluate
from .faults import fault_point, trace, tracing
from .metrics import plot_confusion, plot_curves, write_jsonl
from .precise_bn import calibration_indices, calibration_loader, calibration_size, recalibrate_batchnorm
from .state import (
    list_states,
    load_agreed_state,
    remove_partial_states,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
)

CALIBRATION_IMAGES = 256
"""Training images whose statistics the enhance BatchNorms of a converted pretrained model start from."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint on disk is left untouched."""


@dataclass
class Position:
    """Where training stands: ``epoch`` (0-based, current), ``batch`` (batches of it already trained on),
    ``step`` (optimizer updates so far)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class EpochTally:
    """This rank's running totals of the current epoch (kept in mid-epoch states, so that the record of an epoch
    interrupted and resumed covers all of it): summed loss x images, images, seconds of training, and the
    batches at which it was resumed."""

    loss_sum: float = 0.0
    seen: int = 0
    time_s: float = 0.0
    resumed_at_batch: list[int] = field(default_factory=list)
    partial_from_batch: int | None = None  # resumed from a state without the totals: they start here


_PROBE = "_fcaformer_probe"
"""A keyword no constructor takes (see :func:`check_model_kwargs`)."""


def check_model_kwargs(name: str, kwargs: dict[str, Any], forward_cross_attention: bool = False) -> None:
    """``ConfigError`` for an unknown model or a ``model.kwargs`` key its constructor does not take, naming the key
    and the valid ones, before any data is read. With ``forward_cross_attention`` the conversion's switches
    (:data:`fcaformer.models.any_vit.SWITCHES`) are taken out first: they go to the conversion, not to timm.

    Cheap: with an extra keyword that no constructor takes, construction stops when Python binds the arguments,
    and the error names the first unknown one (the probe itself when the user's keys are all taken). A
    constructor that takes ``**kwargs`` builds the model once and reports its own errors.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown model {name!r} (model.name); e.g. {', '.join(close) or 'fcaformer_l1'}")
    if forward_cross_attention:
        kwargs = split_switches(kwargs)[1]
    if not kwargs:
        return
    try:
        timm.create_model(name, **kwargs, **{_PROBE: True})
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None or unknown.group(1) == _PROBE:
            return
        # only on this error path: a default model shows the constructor's parameters
        parameters = inspect.signature(type(timm.create_model(name)).__init__).parameters
        valid = [p.name for p in parameters.values() if p.name != "self" and p.kind not in (p.VAR_KEYWORD,
                                                                                             p.VAR_POSITIONAL)]
        check_known_keys([unknown.group(1)], valid, f"model.kwargs of {name}")
        raise ConfigError(f"model.kwargs of {name}: {error}") from error


def model_kwargs(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Constructor arguments recorded in the model checkpoint (everything needed to rebuild it)."""
    return {**config.model.kwargs, "num_classes": num_classes, "img_size": config.data.img_size}


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` of the configured network; returns it and its recorded kwargs.

    With ``model.forward_cross_attention`` this is the network before the conversion: the conversion's switches
    among ``model.kwargs`` stay in the recorded kwargs but are not passed to timm.
    """
    kwargs = model_kwargs(config, num_classes)
    create_kwargs = split_switches(kwargs)[1] if config.model.forward_cross_attention else dict(kwargs)
    extra = {"drop_path_rate": config.model.drop_path_rate} if config.model.drop_path_rate else {}
    try:
        model = timm.create_model(config.model.name, **create_kwargs, **extra)
    except TypeError:  # timm models without img_size (e.g. plain CNNs)
        kwargs.pop("img_size")
        create_kwargs.pop("img_size")
        model = timm.create_model(config.model.name, **create_kwargs, **extra)
    return model, kwargs


class Trainer:
    """One training run. ``Trainer(config).fit()`` trains, evaluates and writes the run folder (rank 0 only):

    ``config.yaml``, ``checkpoints/state-*.pt`` (resumable), ``model.pt`` (:func:`fcaformer.weights.load_model`),
    ``metrics.jsonl``, ``curves.png``, ``results.json``, ``confusion.png``.
    """

    def __init__(self, config: TrainConfig, resume_state: dict[str, Any] | None = None,
                 dist: DistInfo | None = None) -> None:
        self.config = config
        self.dist = dist or init_distributed(config.run.device)
        self.device = self.dist.device
        self.out = Path(config.run.output)
        run = config.run
        if run.threads > 0:  # on a shared or oversubscribed CPU, fewer intra-op threads is often much faster
            torch.set_num_threads(run.threads)
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(run.seed + self.dist.rank)
        check_model_kwargs(config.model.name, config.model.kwargs, config.model.forward_cross_attention)

        train_list, val_list = load_image_lists(config.data, progress=config.run.progress and self.dist.is_main)
        self.class_names = train_list.class_names
        # recorded relative to the dataset root: results carry nothing of the machine they were made on
        self.skipped = sorted({relative_path(p, config.data.root) for p in (*train_list.skipped, *val_list.skipped)})
        self.num_classes = len(self.class_names)
        self.train_set, self.val_set = self._datasets(train_list, val_list)

        self.model, self.model_kwargs = build_model(config, self.num_classes)
        self.model_name = config.model.name
        # what was really built (model.name with kwargs may be another variant), for logs, plots and results
        self.model_label = describe_model(self.model_name, self.model_kwargs)
        # Fine-tuning starts from pretrained weights; a resumed run takes its weights (and this report) from its
        # training state instead.
        self.pretrained: dict[str, Any] | None = None
        if config.model.pretrained and resume_state is None:
            report = load_pretrained(self.model, config.model.pretrained, self.class_names,
                                     config.model.head_init_scale, model_label=self.model_label)
            self.pretrained = report.to_dict()
            if self.dist.is_main:
                tqdm.write(report.summary())
        if config.model.forward_cross_attention:
            self._add_forward_cross_attention(train_list)
        self.params = count_params(self.model)
        self.macs = count_macs(self.model, (1, 3, config.data.img_size, config.data.img_size))
        if config.model.freeze_backbone:  # a linear probe: only the classifier trains
            self.model.requires_grad_(False)
            self.model.get_classifier().requires_grad_(True)
        self.model_summary = (f"{self.model_label}: {self.params / 1e6:.2f} M params, {self.macs / 1e6:.1f} MMACs "
                              f"at {config.data.img_size}px")
        self.model.to(self.device)
        if run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if run.fast_attention and fast_attention_modules(self.model):
            set_fast_attention(self.model)
        self.ema = ModelEmaV3(self.model, decay=config.optim.ema_decay) if config.optim.ema else None

        self._build_loaders(train_list)
        self.batches_per_epoch = self.sampler.batches_per_epoch()
        if self.batches_per_epoch < config.optim.accum_steps:
            raise ValueError(
                f"{len(self.train_set)} training images give {self.batches_per_epoch} batches of "
                f"{run.batch_size} per process, fewer than optim.accum_steps={config.optim.accum_steps}; "
                "lower run.batch_size"
            )
        self.updates_per_epoch = self.batches_per_epoch // config.optim.accum_steps
        self.global_batch = run.batch_size * self.dist.world_size * config.optim.accum_steps
        self.lr = config.optim.lr * self.global_batch / config.optim.lr_base_batch
        o = config.optim
        # timm's factory: no weight decay on norms, biases and no_weight_decay(); with optim.layer_decay, one
        # group per layer of the model's group_matcher (param_groups_layer_decay); frozen parameters left out
        self.optimizer = create_optimizer_v2(self.model, o.opt, lr=self.lr, weight_decay=o.weight_decay,
                                             layer_decay=o.layer_decay,
                                             **({"eps": o.eps} if o.opt.lower().startswith("adam") else {}))
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, o.sched, num_epochs=run.epochs, warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr,
            min_lr=o.min_lr, step_on_epochs=False, updates_per_epoch=self.updates_per_epoch,
        )
        a = config.aug
        self.mixup = (
            Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                  label_smoothing=a.smoothing, num_classes=self.num_classes)
            if a.mixup > 0 or a.cutmix > 0 else None
        )
        if self.mixup:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(a.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        autocast(self.device, run.amp)  # validates amp for the device early

        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            align_parameter_strides(self.model, self._example_batch(), autocast(self.device, run.amp))
            # Gradients live in DDP's buckets: no copy between them and .grad on every step.
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        if run.compile:
            self.train_model = torch.compile(self.train_model)

        self.pos = Position()
        self.tally = EpochTally()
        self.last_state_time = time.monotonic()
        self.history: list[dict[str, Any]] = []
        if resume_state is not None:
            self._load_state(resume_state)
        self.writer = None
        if run.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ConfigError("run.tensorboard=true needs the tensorboard package: "
                                  "pip install 'fcaformer[tensorboard]'") from error
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def _add_forward_cross_attention(self, train_list: ImageList) -> None:
        """Convert the built (and pretrained) network; checkpoints then name it ``fca_any`` with ``base``.

        Pretrained weights are kept (``init="keep"``) and the enhance BatchNorms calibrated on
        :data:`CALIBRATION_IMAGES` training images under the eval transform; otherwise the new parts get
        ``fcaformer_l0``'s from-scratch initialisation (a switch ``init`` in ``model.kwargs`` overrides either).
        """
        switches = split_switches(self.model_kwargs)[0]
        switches.setdefault("init", "keep" if self.pretrained else "scratch")
        images = None
        if switches["init"] == "keep":
            dataset = ImageDataset(train_list, build_transforms(self.config)[1])
            loader = calibration_loader(dataset, CALIBRATION_IMAGES, CALIBRATION_IMAGES, 0, self.config.run.seed)
            images = next(iter(loader))[0]
        try:
            self.model = add_forward_cross_attention(self.model, calibration_images=images, **switches)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.forward_cross_attention with {self.model_label}: {error}") from error
        self.model_name, self.model_kwargs = FCA_ENTRY, {"base": self.model_name, **self.model_kwargs}
        self.model_label = describe_model(self.model_name, self.model_kwargs)

    # ---------------------------------------------------------------------------------------------- data
    def _datasets(self, train_list: ImageList, val_list: ImageList) -> tuple[Any, Any]:
        """Worker-path datasets (PIL + timm transforms), or the splits decoded onto the device."""
        d = self.config.data
        if d.on_device:
            store = d.store_size or int(math.floor(d.img_size / d.crop_pct))
            progress = self.config.run.progress and self.dist.is_main
            return (DeviceSplit.from_image_list(train_list, store, self.device, progress),
                    DeviceSplit.from_image_list(val_list, store, self.device, progress))
        train_tf, eval_tf = build_transforms(self.config)
        return ImageDataset(train_list, train_tf), ImageDataset(val_list, eval_tf)

    def _build_loaders(self, train_list: ImageList) -> None:
        """``self.sampler`` (set_epoch, batches_per_epoch), ``self.loader``, ``self.val_loader`` and, for precise
        BN, ``self.bn_loader``: a fixed subset of ``self.bn_images`` training images under the eval transform."""
        d, a, run = self.config.data, self.config.aug, self.config.run
        rank, world = self.dist.rank, self.dist.world_size
        # a linear probe keeps the pretrained BatchNorm statistics
        self.bn_images = (0 if self.config.model.freeze_backbone
                          else calibration_size(run.precise_bn_images, run.epochs, len(self.train_set)))
        if d.on_device:
            augment = DeviceAugment(d.img_size, a.scale, hflip=a.hflip, color_jitter=a.color_jitter, mean=d.mean,
                                    std=d.std)
            self.sampler = self.loader = DeviceTrainLoader(self.train_set, augment, run.batch_size, rank=rank,
                                                           world_size=world, seed=run.seed)
            self.val_loader = DeviceEvalLoader(self.val_set, run.batch_size, d.img_size, d.crop_pct, d.mean, d.std,
                                               rank=rank, world_size=world)
            chosen = calibration_indices(len(self.train_set), self.bn_images, run.seed)
            calibration = DeviceSplit(self.train_set.images[chosen], self.train_set.labels[chosen])
            self.bn_loader = DeviceEvalLoader(calibration, run.batch_size, d.img_size, d.crop_pct, d.mean, d.std,
                                              rank=rank, world_size=world)
            self.index_sampler = self.loader.sampler
            return
        self.sampler = self.index_sampler = ResumableSampler(self.train_set, run.batch_size, rank=rank,
                                                             world_size=world, seed=run.seed)
        self.loader = train_loader(self.train_set, self.sampler, run.batch_size, d.workers)
        self.val_loader = eval_loader(self.val_set, run.batch_size, d.workers, rank, world)
        self.bn_loader = calibration_loader(ImageDataset(train_list, self.val_set.transform), self.bn_images,
                                            run.batch_size, d.workers, run.seed, rank, world)

    def _example_batch(self) -> torch.Tensor:
        """Two training-size images on the device, in the training memory format."""
        size = self.config.data.img_size
        images = torch.zeros(2, 3, size, size, device=self.device)
        return images.contiguous(memory_format=torch.channels_last) if self.config.run.channels_last else images

    # ----------------------------------------------------------------------------------------- checkpoints
    def _state(self, tallies: list[list[float]] | None) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "model_label": self.model_label,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.pos.epoch,
            "batch": self.pos.batch,
            "step": self.pos.step,
            # mid-epoch: every rank's totals of the epoch so far (rank r's at index r)
            "epoch_tally": None if tallies is None else {
                "loss_sum": [t[0] for t in tallies], "seen": [int(t[1]) for t in tallies],
                "time_s": self.tally.time_s, "resumed_at_batch": self.tally.resumed_at_batch},
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "class_names": self.class_names,
            "history": self.history,
            "pretrained": self.pretrained,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(state["epoch"], state["batch"], state["step"])
        # The schedule is the config's, not the state's (a resumed run may be given more epochs): the lr of the
        # first resumed step is the one this schedule gives at this step.
        self.scheduler.step_update(self.pos.step)
        self.history = list(state.get("history", []))
        self.pretrained = state.get("pretrained")
        set_rng_state(state["rng"])
        tally = state.get("epoch_tally")
        if self.pos.batch and tally and len(tally["loss_sum"]) == self.dist.world_size:
            rank = self.dist.rank
            self.tally = EpochTally(tally["loss_sum"][rank], tally["seen"][rank], tally["time_s"],
                                    [*tally["resumed_at_batch"], self.pos.batch])
        elif self.pos.batch:  # an older state, or another number of processes: the totals restart here
            self.tally = EpochTally(partial_from_batch=self.pos.batch)

    def position(self) -> int:
        """Batches trained on since the start of the run (what the state files are named after)."""
        return self.pos.epoch * self.batches_per_epoch + self.pos.batch

    def save_checkpoint(self) -> None:
        """Training state after the current position (rank 0 writes; all ranks take part and wait for it)."""
        tallies = gather_values([self.tally.loss_sum, self.tally.seen], self.device) if self.pos.batch else None
        if self.dist.is_main:
            save_state(self.out / "checkpoints", self.position(), self._state(tallies),
                       keep=self.config.run.keep_ckpts)
        self.last_state_time = time.monotonic()
        barrier()

    def _time_for_state(self) -> bool:
        """Whether ``run.ckpt_every_minutes`` have passed since the last state (rank 0's clock decides for all)."""
        minutes = self.config.run.ckpt_every_minutes
        if not minutes:
            return False
        return decided_by_main(time.monotonic() - self.last_state_time >= 60 * minutes, self.device)

    def eval_model(self) -> nn.Module:
        """The weights used for evaluation and export: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def save_model_file(self, metrics: dict[str, Any] | None = None) -> Path | None:
        """``model.pt``: the evaluation weights in the self-describing project format (rank 0)."""
        if not self.dist.is_main:
            return None
        return save_model(
            self.out / "model.pt", self.eval_model(), self.model_name, self.model_kwargs,
            class_names=self.class_names,
            data_config=preprocessing_config(asdict(self.config.data)),
            metrics=metrics or {}, train_config=self.config.to_dict(), macs=self.macs, pretrained=self.pretrained,
        )

    # ------------------------------------------------------------------------------------------- training
    def _train_epoch(self, epoch: int, bar: tqdm | None) -> dict[str, float]:
        cfg, accum = self.config, self.config.optim.accum_steps
        self.train_model.train()
        if cfg.model.freeze_backbone:  # linear probe: the frozen trunk computes as in evaluation
            self.model.eval()
            self.model.get_classifier().train()
        self.sampler.set_epoch(epoch, self.pos.batch)
        self.optimizer.zero_grad(set_to_none=not self.dist.distributed)
        pending: list[torch.Tensor] = []  # losses not yet checked: each check waits for the device
        tally = self.tally  # restored from a mid-epoch state, or zero
        last_loss, start = float("nan"), time.perf_counter() - tally.time_s
        for index, (images, targets) in enumerate(self.loader, start=self.pos.batch):
            # One seed per batch (and rank): drop-path and Mixup draws are a function of the position.
            seed_everything(sample_seed(cfg.run.seed + 7_777 * self.dist.rank, epoch, index))
            images, targets = images.to(self.device), targets.to(self.device)
            if cfg.run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            sync = (index + 1) % accum == 0
            ddp_sync = nullcontext() if sync or not self.dist.distributed else self.train_model.no_sync()
            with ddp_sync:
                with autocast(self.device, cfg.run.amp):
                    loss = self.criterion(self.train_model(images), targets)
                pending.append(loss.detach())
                if len(pending) >= cfg.run.log_every:  # every batch by default: before its backward
                    total, last_loss = self._check_losses(pending, epoch, index)
                    tally.loss_sum += total * len(images)
                self.scaler.scale(loss / accum).backward()
            tally.seen += len(images)
            if sync:
                self._optimizer_step()
                self.pos.batch = index + 1
            if tracing():
                trace("batch", position=epoch * self.batches_per_epoch + index, epoch=epoch, batch=index,
                      step=self.pos.step, samples=self.index_sampler.batch_indices(index))
            if sync and self.pos.batch < self.batches_per_epoch and self._mid_epoch_state_due():
                if pending:
                    tally.loss_sum += self._check_losses(pending, epoch, index)[0] * len(images)
                tally.time_s = time.perf_counter() - start
                self.save_checkpoint()
            if bar is not None:
                if not pending:
                    rate = tally.seen * self.dist.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{self._lr():.2e}",
                                    img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if cfg.run.max_steps is not None and self.pos.step >= cfg.run.max_steps:
                break
        if pending:  # batches are full (drop_last), so every loss weighs len(images)
            tally.loss_sum += self._check_losses(pending, epoch, index)[0] * len(images)
        elapsed = time.perf_counter() - start
        record = {
            "train_loss": mean_over_ranks(tally.loss_sum / max(tally.seen, 1), self.device),
            "lr": self._lr(),
            "epoch_time_s": elapsed,
            "train_images_per_s": tally.seen * self.dist.world_size / max(elapsed, 1e-9),
        }
        if tally.resumed_at_batch:  # the totals cover the whole epoch; the time excludes the restarts
            record["resumed_at_batch"] = tally.resumed_at_batch
        if tally.partial_from_batch is not None:
            record["partial_from_batch"] = tally.partial_from_batch  # loss, time and rate of these batches only
        self.tally = EpochTally()
        return record

    def _mid_epoch_state_due(self) -> bool:
        """A state after this optimizer step: every ``run.ckpt_every_steps`` steps, or when
        ``run.ckpt_every_minutes`` have passed (checked when losses are, every ``run.log_every`` steps, where the
        device is waited for anyway). The same answer on every rank."""
        every, step = self.config.run.ckpt_every_steps, self.pos.step
        return bool(every and step % every == 0) or (step % self.config.run.log_every == 0
                                                    and self._time_for_state())

    def _lr(self) -> float:
        """The current lr of the head (with layer decay the earlier groups train at a fraction of it)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _check_losses(self, pending: list[torch.Tensor], epoch: int, last_index: int) -> tuple[float, float]:
        """Raise :class:`TrainingDiverged` if any pending loss (batches ending at ``last_index``) is not finite
        on any rank; else return their sum and the last one. Empties ``pending``."""
        losses = torch.stack(pending).float()
        pending.clear()
        if not all_true(bool(torch.isfinite(losses).all().item()), self.device):
            values = losses.tolist()
            bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
            raise TrainingDiverged(
                f"loss is {values[bad]} at epoch {epoch}, batch {last_index - len(values) + 1 + bad} (step "
                f"{self.pos.step}); stopping. The last good checkpoint in {self.out / 'checkpoints'} is intact: "
                "lower optim.lr, set optim.clip_grad, or use run.amp=none, then resume or restart"
            )
        return float(losses.sum().item()), float(losses[-1].item())

    def _optimizer_step(self) -> None:
        clip = self.config.optim.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # DDP keeps gradients as views of its buckets: zeroing them in place avoids a copy per step.
        self.optimizer.zero_grad(set_to_none=not self.dist.distributed)
        self.pos.step += 1
        self.scheduler.step_update(self.pos.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.pos.step)

    def _evaluate(self, progress: bool) -> EvalResult:
        trace("eval", phase="start", position=self.position())
        fault_point("eval")
        if self.bn_images:
            recalibrate_batchnorm(self.eval_model(), self.bn_loader, self.device, self.config.run.amp,
                                  self.config.run.channels_last)
        result = evaluate(self.eval_model(), self.val_loader, self.num_classes, self.device, self.config.run.amp,
                          progress=progress, desc="val", channels_last=self.config.run.channels_last)
        trace("eval", phase="end", position=self.position())
        return result

    def fit(self) -> dict[str, Any]:
        """Train from the current position to the end, evaluating and checkpointing every epoch.

        Returns the final summary (also written to ``results.json``)."""
        cfg, main = self.config, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", lambda h: yaml.safe_dump(cfg.to_dict(), h, sort_keys=False),
                         binary=False)
            remove_partial_states(self.out / "checkpoints")  # temporary files of writes a kill interrupted
        trace("start", position=self.position(), step=self.pos.step, world_size=self.dist.world_size)
        show = cfg.run.progress and main
        stopped = False
        result: EvalResult | None = None
        for epoch in range(self.pos.epoch, cfg.run.epochs):
            self.pos.epoch = epoch
            bar = tqdm(total=self.batches_per_epoch, initial=self.pos.batch, desc=f"epoch {epoch + 1}/{cfg.run.epochs}",
                       disable=not show, mininterval=2, dynamic_ncols=True)
            record: dict[str, Any] = {"epoch": epoch + 1, **self._train_epoch(epoch, bar if show else None)}
            bar.close()
            stopped = cfg.run.max_steps is not None and self.pos.step >= cfg.run.max_steps
            last = epoch + 1 == cfg.run.epochs or stopped
            result = None
            if last or (epoch + 1) % cfg.run.eval_every == 0:
                result = self._evaluate(show)
                record.update(val_top1=result.top1, val_top5=result.top5, val_loss=result.loss)
            else:
                record.update(val_top1=None, val_top5=None, val_loss=None)
            self.history.append(record)
            if not (stopped and self.pos.batch < self.batches_per_epoch):  # else: resumable mid-epoch
                self.pos = Position(epoch + 1, 0, self.pos.step)
            if last or (epoch + 1) % cfg.run.ckpt_every_epochs == 0 or self._time_for_state():
                self.save_checkpoint()
            if main:
                write_jsonl(self.out / "metrics.jsonl", self.history)
                if result is not None:  # curves and model.pt follow the evaluations
                    plot_curves(self.history, self.out / "curves.png", title=f"{self.model_summary} - {self.out.name}")
                    self.save_model_file(record)
                if self.writer is not None:
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            self.writer.add_scalar(key, value, epoch + 1)
                    self.writer.flush()
                top1 = "-" if record["val_top1"] is None else f"{record['val_top1']:.2f}"
                tqdm.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val top-1 {top1}, "
                           f"{record['epoch_time_s']:.1f} s")
            if stopped:
                break
        if result is None:
            result = self._evaluate(show)
        return self._finish(result)

    def _finish(self, result: EvalResult) -> dict[str, Any]:
        epoch_times = [h["epoch_time_s"] for h in self.history]
        summary = {
            "model": self.model_label,
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "params": self.params,
            "macs": self.macs,
            "img_size": self.config.data.img_size,
            "train_images": len(self.train_set),
            "val_images": len(self.val_set),
            "epochs_done": self.pos.epoch,
            "steps": self.pos.step,
            "world_size": self.dist.world_size,
            "distributed": self.dist.distributed,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "precise_bn_images": self.bn_images,
            "pretrained": self.pretrained,
            "mean_epoch_time_s": sum(epoch_times) / max(len(epoch_times), 1),
            "val": result.summary(),
            "per_class_acc": dict(zip(self.class_names, result.per_class_acc)),
            "skipped_files": len(self.skipped),
            "skipped_list": self.skipped,
        }
        if self.dist.is_main:
            atomic_json_dump({**summary, "confusion": result.confusion, "class_names": self.class_names},
                             self.out / "results.json")
            import numpy as np

            plot_confusion(np.array(result.confusion), self.class_names, self.out / "confusion.png",
                           title=f"{self.model_summary}; top-1 {result.top1:.2f}%")
            if self.writer is not None:
                self.writer.close()
        return summary


AUTO = "auto"
"""``resume=AUTO`` (``--resume auto``): continue the run folder's newest good state if it has one, else start."""


def _describe_changes(keys: list[str], run: TrainConfig, now: TrainConfig) -> str:
    before, after = flat_config(run), flat_config(now)
    shown = "; ".join(f"{key}: {before[key]!r} in the run, {after[key]!r} now" for key in keys[:3])
    return shown + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


def _with_keys(config: TrainConfig, source: TrainConfig, keys: tuple[str, ...]) -> TrainConfig:
    """``config`` with the values of ``keys`` taken from ``source``."""
    values, mapping = flat_config(source), {}
    for key in keys:
        section, name = key.split(".")
        mapping.setdefault(section, {})[name] = values[key]
    return apply_mapping(config, mapping, "the resuming command").validate()


def _start_fresh(config: TrainConfig, info: DistInfo) -> None:
    """Check that ``config.run.output`` is free for a new run of ``config``: a folder holding a run of another
    config is refused (two datasets must not share a run folder), one holding an earlier run of this config is
    taken over (its training states removed, so that no later resume picks one of them up)."""
    out = Path(config.run.output)
    saved = out / "config.yaml"
    if saved.is_file():
        try:
            previous = config_from_dict(yaml.safe_load(saved.read_text()) or {})
        except (ConfigError, yaml.YAMLError) as error:
            raise ConfigError(f"{out} holds another run ({saved} cannot be read as this version's config: "
                              f"{error}); give another --output for this run, or delete the folder") from error
        changed = config_differences(previous, config)
        if changed:
            raise ConfigError(f"{out} holds a run of another config ({_describe_changes(changed, previous, config)})"
                              "; give another --output for this run, --resume auto to continue that one, or "
                              "delete the folder")
    old = list_states(out / "checkpoints")
    if old and info.is_main:
        tqdm.write(f"starting a new run in {out}: removing the {len(old)} training states of an earlier run of "
                   "this config (--resume auto continues a run instead)")
        for path in old:
            path.unlink(missing_ok=True)
    barrier()


def train(config: TrainConfig, resume: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train and return the summary (also in ``results.json``).

    ``resume``:

    - ``None``: a new run of ``config`` in ``config.run.output`` (refused if the folder holds a run of another
      config; an earlier run of the same config is replaced);
    - ``"auto"`` (:data:`AUTO`): continue the run in ``config.run.output`` from its newest good state if it has
      one, else start it, so that one command is right for the first start and for every restart (``torchrun
      --max-restarts``). A state of another config is refused; the keys in
      :data:`~fcaformer.train.config.RESUMABLE_KEYS` (epochs, logging, checkpointing) are taken from ``config``;
    - a run folder or state file: continue that run with its saved config, of which the ``section.key=value``
      ``overrides`` may change the resumable keys (others are ignored).

    All ranks resume from the same state (rank 0 chooses it). The log says which state, epoch and step.
    """
    info = init_distributed(config.run.device)
    # before a state or the data is read
    check_model_kwargs(config.model.name, config.model.kwargs, config.model.forward_cross_attention)
    state, path = None, None
    if resume == AUTO:
        found = load_agreed_state(Path(config.run.output))
        if found is None:
            if info.is_main:
                tqdm.write(f"--resume auto: no training state in {Path(config.run.output) / 'checkpoints'}; "
                           "starting a new run")
            _start_fresh(config, info)
        else:
            state, path = found
            saved = config_from_dict(state["config"])
            changed = config_differences(saved, config)
            if changed:
                raise ConfigError(f"--resume auto: the run in {config.run.output} has another config "
                                  f"({_describe_changes(changed, saved, config)}); give the options it was started "
                                  "with, or another --output for a new run")
            config = _with_keys(saved, config, RESUMABLE_KEYS)
    elif resume is not None:
        found = load_agreed_state(Path(resume))
        if found is None:
            raise FileNotFoundError(f"nothing to resume: no state-*.pt checkpoint in {resume}")
        state, path = found
        config = config_from_dict(state["config"])
        for text in overrides:
            key = text.split("=", 1)[0].strip()
            if key in RESUMABLE_KEYS and key != "run.output":
                apply_mapping(config, parse_override(text), f"override {text!r}")
        if Path(resume).is_dir():
            config.run.output = str(Path(resume))
        config.validate()
    else:
        _start_fresh(config, info)
    trainer = Trainer(config, resume_state=state, dist=info)
    if info.is_main and path is not None:
        pos = trainer.pos
        where = (f"epoch {pos.epoch + 1} of {config.run.epochs}, batch {pos.batch} of {trainer.batches_per_epoch}"
                 if pos.epoch < config.run.epochs else f"the end of epoch {pos.epoch} of {config.run.epochs}")
        tqdm.write(f"resumed from {path}: {where}, step {pos.step}")
    if math.isfinite(trainer.lr) and info.is_main and config.run.progress:
        tqdm.write(f"{trainer.model_summary}; {len(trainer.train_set)} train / {len(trainer.val_set)} val images, "
                   f"{trainer.num_classes} classes; global batch {trainer.global_batch}, lr {trainer.lr:.2e} "
                   f"(optim.lr {config.optim.lr:g} for a batch of {config.optim.lr_base_batch})")
        if trainer.skipped:
            tqdm.write(f"skipped {len(trainer.skipped)} unreadable files (listed in results.json)")
    return trainer.fit()


def train_or_resume(config: TrainConfig) -> dict[str, Any]:
    """Bring the run in ``config.run.output`` to its end and return its summary: read when the run has finished
    (``results.json``), resumed from its latest training state when it was interrupted, else trained from the
    start. Experiments of many runs use it to be restartable at any time."""
    out = Path(config.run.output)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    return train(config, resume=AUTO)
