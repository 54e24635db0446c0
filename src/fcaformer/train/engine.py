"""The training loop: timm optimizer/scheduler/Mixup/EMA, DDP, AMP, accumulation, crash-safe checkpoints.

Determinism: every batch runs under a seed derived from (run seed, rank, epoch, batch index) and every sample is
augmented under its own seed (see :mod:`.data`), so a run resumed from a mid-epoch checkpoint reproduces an
uninterrupted run exactly (in deterministic mode, same hardware and thread count).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
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
from ..io import atomic_json_dump, atomic_write, relative_path, save_model
from ..models.any_vit import FCA_ENTRY, add_forward_cross_attention, split_switches
from ..models.names import describe_model
from ..pretrained import load_pretrained, preprocessing_config
from ..profile import count_macs, count_params
from .config import ConfigError, TrainConfig, config_from_dict
from .data import (
    ImageDataset,
    ImageList,
    ResumableSampler,
    build_transforms,
    eval_loader,
    load_image_lists,
    sample_seed,
    train_loader,
)
from .device_data import DeviceAugment, DeviceEvalLoader, DeviceSplit, DeviceTrainLoader
from .distributed import DistInfo, align_parameter_strides, all_true, barrier, init_distributed, mean_over_ranks
from .evaluate import EvalResult, autocast, evaluate
from .metrics import plot_confusion, plot_curves, write_jsonl
from .precise_bn import calibration_indices, calibration_loader, calibration_size, recalibrate_batchnorm
from .state import list_states, load_latest_state, rng_state, save_state, set_rng_state

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_kwargs(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Constructor arguments recorded in the model checkpoint (everything needed to rebuild it)."""
    return {**config.model.kwargs, "num_classes": num_classes, "img_size": config.data.img_size}


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` of the configured network; returns it and its recorded kwargs.

    With ``model.forward_cross_attention`` this is the network before the conversion: the conversion's switches
    among ``model.kwargs`` stay in the recorded kwargs but are not passed to timm.
    """
    import fcaformer  # noqa: F401  (registers the FcaFormer models with timm)

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

    ``config.yaml``, ``checkpoints/state-*.pt`` (resumable), ``model.pt`` (:func:`fcaformer.io.load_model`),
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

        train_list, val_list = load_image_lists(config.data)
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
            return (DeviceSplit.from_image_list(train_list, store, self.device),
                    DeviceSplit.from_image_list(val_list, store, self.device))
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
            return
        self.sampler = ResumableSampler(self.train_set, run.batch_size, rank=rank, world_size=world, seed=run.seed)
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
    def _state(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "model_label": self.model_label,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.pos.epoch,
            "batch": self.pos.batch,
            "step": self.pos.step,
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
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(state["epoch"], state["batch"], state["step"])
        self.history = list(state.get("history", []))
        self.pretrained = state.get("pretrained")
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Training state after the current position (rank 0 writes; all ranks wait for it)."""
        if self.dist.is_main:
            position = self.pos.epoch * self.batches_per_epoch + self.pos.batch
            save_state(self.out / "checkpoints", position, self._state(), keep=self.config.run.keep_ckpts)
        barrier()

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
        loss_sum, last_loss, seen, start = 0.0, float("nan"), 0, time.perf_counter()
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
                    loss_sum += total * len(images)
                self.scaler.scale(loss / accum).backward()
            seen += len(images)
            if sync:
                self._optimizer_step()
                self.pos.batch = index + 1
                every = cfg.run.ckpt_every_steps
                if every and self.pos.step % every == 0 and self.pos.batch < self.batches_per_epoch:
                    if pending:
                        loss_sum += self._check_losses(pending, epoch, index)[0] * len(images)
                    self.save_checkpoint()
            if bar is not None:
                if not pending:
                    rate = seen * self.dist.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{self._lr():.2e}",
                                    img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if cfg.run.max_steps is not None and self.pos.step >= cfg.run.max_steps:
                break
        if pending:  # batches are full (drop_last), so every loss weighs len(images)
            loss_sum += self._check_losses(pending, epoch, index)[0] * len(images)
        elapsed = time.perf_counter() - start
        return {
            "train_loss": mean_over_ranks(loss_sum / max(seen, 1), self.device),
            "lr": self._lr(),
            "epoch_time_s": elapsed,
            "train_images_per_s": seen * self.dist.world_size / max(elapsed, 1e-9),
        }

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
        if self.bn_images:
            recalibrate_batchnorm(self.eval_model(), self.bn_loader, self.device, self.config.run.amp,
                                  self.config.run.channels_last)
        return evaluate(self.eval_model(), self.val_loader, self.num_classes, self.device, self.config.run.amp,
                        progress=progress, desc="val", channels_last=self.config.run.channels_last)

    def fit(self) -> dict[str, Any]:
        """Train from the current position to the end, evaluating and checkpointing every epoch.

        Returns the final summary (also written to ``results.json``)."""
        cfg, main = self.config, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", lambda h: yaml.safe_dump(cfg.to_dict(), h, sort_keys=False),
                         binary=False)
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
            if last or (epoch + 1) % cfg.run.ckpt_every_epochs == 0:
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


def resume_config(target: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved config and state of the newest readable checkpoint of a run folder (or a state file)."""
    state, path = load_latest_state(Path(target))
    config = config_from_dict(state["config"])
    if Path(target).is_dir():
        config.run.output = str(Path(target))
    return config, state


def train(config: TrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train ``config`` (or resume the run in ``resume``, whose saved config wins) and return the summary."""
    state = None
    if resume is not None:
        config, state = resume_config(resume)
    trainer = Trainer(config, resume_state=state)
    if math.isfinite(trainer.lr) and trainer.dist.is_main and config.run.progress:
        tqdm.write(f"{trainer.model_summary}; {len(trainer.train_set)} train / {len(trainer.val_set)} val images, "
                   f"{trainer.num_classes} classes; global batch {trainer.global_batch}, lr {trainer.lr:.2e}")
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
    return train(config, resume=out if list_states(out / "checkpoints") else None)
