"""Evaluation: top-1/top-5, loss, per-class accuracy and confusion matrix with torchmetrics (reduced over ranks)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from tqdm import tqdm

from .distributed import mean_over_ranks


@dataclass
class EvalResult:
    """Metrics of one pass over a validation set (percentages for accuracies)."""

    top1: float
    top5: float
    loss: float
    images: int
    images_per_s: float
    per_class_acc: list[float]
    confusion: list[list[int]]

    def summary(self) -> dict:
        """Scalars only (for logs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("per_class_acc", "confusion")}


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CPU or GPU, fp16 on GPU only; a no-op for ``none``."""
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("run.amp=fp16 needs a CUDA GPU (its grad scaler is GPU-only); use run.amp=bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, amp: str = "none",
             progress: bool = False, desc: str = "eval", channels_last: bool = False) -> EvalResult:
    """Evaluate ``model`` (put in eval mode) on ``loader``; with torch.distributed initialised each rank passes
    its shard and the metrics are reduced over all ranks."""
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    per_class = MulticlassAccuracy(num_classes, average=None).to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    mean_loss = MeanMetric().to(device)
    start, count = time.perf_counter(), 0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=2):
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        mean_loss.update(F.cross_entropy(logits, targets, reduction="none"))
        for metric in (top1, top5, per_class, confusion):
            metric.update(logits, targets)
        count += len(targets)
    elapsed = mean_over_ranks(time.perf_counter() - start, device)
    total = int(confusion.compute().sum().item())
    return EvalResult(
        top1=100 * top1.compute().item(),
        top5=100 * top5.compute().item(),
        loss=mean_loss.compute().item(),
        images=total,
        images_per_s=total / max(elapsed, 1e-9),
        per_class_acc=[100 * v for v in per_class.compute().tolist()],
        confusion=confusion.compute().long().tolist(),
    )
