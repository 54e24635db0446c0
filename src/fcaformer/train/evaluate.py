"""Evaluation: top-1/top-5, loss, per-class accuracy and confusion matrix, counted on each rank and summed over
ranks (exact: each rank passes its own shard, without padding)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
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
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)  # rows: true class
    # summed over the images: cross-entropy, top-k hits
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    top_k = min(5, num_classes)
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=2):
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += (logits.topk(top_k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    elapsed = mean_over_ranks(time.perf_counter() - start, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(sums)
    total = int(confusion.sum().item())
    per_class = confusion.diagonal().double() / confusion.sum(dim=1).clamp_min(1)
    return EvalResult(
        top1=100 * confusion.diagonal().sum().item() / max(total, 1),
        top5=100 * sums[1].item() / max(total, 1),
        loss=sums[0].item() / max(total, 1),
        images=total,
        images_per_s=total / max(elapsed, 1e-9),
        per_class_acc=[100 * v for v in per_class.tolist()],
        confusion=confusion.tolist(),
    )
