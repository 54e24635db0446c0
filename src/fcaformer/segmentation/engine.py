"""Train, evaluate (mIoU / pixel accuracy via torchmetrics) and run UperNet segmentors on images."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm import tqdm

from ..detection.engine import read_image
from ..detection.training import DenseTrainConfig, load_task_model, train_dense_task
from ..io import atomic_write
from .data import IGNORE_INDEX, SegmentationFolder, normalize
from .model import SIZE_DIVISOR, segment_logits, segmentor_trunk, upernet

log = logging.getLogger(__name__)
TASK = "segmentation"


@dataclass(kw_only=True)
class SegmentTrainConfig(DenseTrainConfig):
    """Everything ``fcaformer segment train`` needs (keywords only); stored in the checkpoints."""

    img_dir: str
    ann_dir: str
    num_classes: int
    decoder_channels: int = 512
    decoder_norm: str = "batchnorm"
    reduce_zero_label: bool = False
    crop_size: tuple[int, int] = (512, 512)
    base_size: int = 512
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    batch_size: int = 8
    class_names: list[str] | None = None
    val_img_dir: str | None = None
    val_ann_dir: str | None = None
    val_mode: str = "whole"
    val_test_size: int | None = None  # shorter side at evaluation; None: base_size (the training scale)


def builder_kwargs(config: SegmentTrainConfig) -> dict[str, Any]:
    """Arguments of :func:`~fcaformer.segmentation.model.upernet` for a config (weights not included)."""
    return dict(variant=config.variant, num_classes=config.num_classes, backbone_mode=config.backbone_mode,
                backbone_kwargs=dict(config.backbone_kwargs), decoder_channels=config.decoder_channels,
                decoder_norm=config.decoder_norm)


def segmentation_loss(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """Pixel-wise cross entropy, label 255 ignored."""
    images, labels = batch
    device = next(model.parameters()).device
    logits = model(images.to(device))
    return {"loss_ce": F.cross_entropy(logits, labels.to(device), ignore_index=IGNORE_INDEX)}


def train_segmentor(config: SegmentTrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train UperNet on an ADE20K-format folder pair; writes ``last.pt`` (resumable) and ``model.pt``.

    Returns ``{"losses": [...], "metrics": {...} (with a validation set), "checkpoint": path}``. Under
    torchrun each rank trains on its shard (DDP; gloo on CPU); rank 0 writes files and evaluates.
    """
    for side in config.crop_size:
        if side % SIZE_DIVISOR:
            raise ValueError(f"crop_size sides must be multiples of {SIZE_DIVISOR}, got {config.crop_size}")

    def evaluate(model: nn.Module) -> dict[str, Any]:
        val = SegmentationFolder(config.val_img_dir, config.val_ann_dir, config.num_classes,
                                 reduce_zero_label=config.reduce_zero_label)
        test_size = config.base_size if config.val_test_size is None else config.val_test_size
        return evaluate_segmentor(model, val, mode=config.val_mode, test_size=test_size,
                                  crop_size=config.crop_size, show_progress=show_progress)

    return train_dense_task(
        config, TASK,
        make_dataset=lambda: SegmentationFolder(config.img_dir, config.ann_dir, config.num_classes,
                                                reduce_zero_label=config.reduce_zero_label, train=True,
                                                base_size=config.base_size, scale_range=config.scale_range,
                                                crop_size=config.crop_size),
        builder_for=lambda dataset: builder_kwargs(config),
        build_model=upernet,
        trunk_of=segmentor_trunk,
        meta_for=lambda dataset: dict(class_names=config.class_names, reduce_zero_label=config.reduce_zero_label),
        loss_fn=segmentation_loss,
        # a one-image remainder batch fails BatchNorm after the decoder's 1x1 pyramid pooling
        drop_last=True,
        evaluate=evaluate if config.val_img_dir and config.val_ann_dir else None,
        # the scale / crop / flip augmentations draw from Python's random, not torch's generator
        seeders=(torch.manual_seed, np.random.seed, random.seed),
        show_progress=show_progress,
    )


def load_segmentor(path: str | os.PathLike | Mapping[str, Any], device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a segmentor from a checkpoint of :func:`train_segmentor`; returns ``(model in eval mode, raw)``."""
    return load_task_model(path, TASK, upernet, device)


@torch.no_grad()
def infer(model: nn.Module, image: torch.Tensor, mode: str = "whole", crop_size: Sequence[int] = (512, 512),
          stride: Sequence[int] | None = None, test_size: int = 0) -> torch.Tensor:
    """Class logits ``(K, H, W)`` for one normalised ``(3, H, W)`` image at its own resolution.

    ``mode="whole"`` runs the image at once; ``"slide"`` runs overlapping ``crop_size`` windows (``stride``
    default: 2/3 of the crop) and averages overlapping logits, as mmseg's slide inference. ``test_size`` > 0
    first resizes the shorter side to it (logits are resized back).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    model.eval()
    device = next(model.parameters()).device
    height, width = image.shape[-2:]
    x = image[None].to(device)
    if test_size:
        scale = test_size / min(height, width)
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear",
                          align_corners=False)
    if mode == "whole":
        logits = segment_logits(model, x)
    else:
        crop_h, crop_w = crop_size
        stride_h, stride_w = stride or (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))
        full_h, full_w = x.shape[-2:]
        rows = max(full_h - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(full_w - crop_w + stride_w - 1, 0) // stride_w + 1
        logits = counts = None
        for row in range(rows):
            for col in range(cols):
                top = min(row * stride_h, max(full_h - crop_h, 0))
                left = min(col * stride_w, max(full_w - crop_w, 0))
                window = x[:, :, top:top + crop_h, left:left + crop_w]
                out = segment_logits(model, window)
                if logits is None:
                    logits = x.new_zeros(1, out.shape[1], full_h, full_w)
                    counts = x.new_zeros(1, 1, full_h, full_w)
                logits[:, :, top:top + window.shape[2], left:left + window.shape[3]] += out
                counts[:, :, top:top + window.shape[2], left:left + window.shape[3]] += 1
        logits = logits / counts
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0].cpu()


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU (mean over classes present in prediction or ground truth), pixel accuracy and per-class IoU
    from a ``(K, K)`` confusion matrix (rows: truth, columns: prediction)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = intersection / union  # NaN where a class is absent from both: left out of the mean, as in mmseg
    return {
        "mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else 0.0,
        "pixel_acc": float(intersection.sum() / confusion.sum()) if confusion.sum() > 0 else 0.0,
        "per_class_iou": [None if torch.isnan(v) else float(v) for v in iou],
    }


def evaluate_segmentor(model: nn.Module, dataset: SegmentationFolder, mode: str = "whole",
                       crop_size: Sequence[int] = (512, 512), test_size: int = 0,
                       show_progress: bool = True) -> dict[str, Any]:
    """mIoU and pixel accuracy over ``dataset`` (whole images, label 255 ignored) from torchmetrics'
    multiclass confusion matrix."""
    confusion = MulticlassConfusionMatrix(dataset.num_classes, ignore_index=IGNORE_INDEX)
    for index in tqdm(range(len(dataset)), desc="eval", disable=not show_progress, dynamic_ncols=True):
        image, label = dataset.load(index)
        logits = infer(model, normalize(image), mode, crop_size, test_size=test_size)
        confusion.update(logits.argmax(0).flatten(), label.flatten())
    return scores_from_confusion(confusion.compute())


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), ``(num_classes, 3)`` uint8; distinct for up to 256."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def blend(image: torch.Tensor, prediction: torch.Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: the class colours over the image with opacity ``alpha``."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.float32)
    mask = colours[prediction.numpy()].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * mask).round().clip(0, 255).astype(np.uint8)


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  num_classes: int, mode: str = "whole", crop_size: Sequence[int] = (512, 512),
                  alpha: float = 0.5, test_size: int = 0, show_progress: bool = True) -> list[Path]:
    """Segment image files; writes ``<stem>.png`` (colour mask blended over the image) and
    ``<stem>_labels.png`` (class indices) into ``out_dir``."""
    out_dir = Path(out_dir)
    colours = palette(num_classes)
    written = []
    for path in tqdm(paths, desc="predict", disable=not show_progress, dynamic_ncols=True):
        image = read_image(path)
        prediction = infer(model, normalize(image), mode, crop_size, test_size=test_size).argmax(0)
        overlay = Image.fromarray(blend(image, prediction, colours, alpha))
        labels = Image.fromarray(prediction.numpy().astype(np.uint8), mode="L")
        stem = Path(path).stem
        written.append(atomic_write(out_dir / f"{stem}.png", lambda h, p=overlay: p.save(h, format="PNG")))
        atomic_write(out_dir / f"{stem}_labels.png", lambda h, p=labels: p.save(h, format="PNG"))
    return written
