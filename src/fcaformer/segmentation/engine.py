"""Train, evaluate (mIoU / pixel accuracy via torchmetrics) and run UperNet segmentors on images."""

from __future__ import annotations

import functools
import logging
import os
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

from ..detection.inputs import PredictInputs, SampleError, palette
from ..detection.model import check_builder_kwargs
from ..detection.training import DenseTrainConfig, load_task_model, train_dense_task
from ..files import atomic_json_dump, atomic_write, portable_path, pyplot, save_figure
from .data import IGNORE_INDEX, SegmentationFolder, normalize
from .model import SIZE_DIVISOR, segment_logits, segmentor_trunk, upernet

log = logging.getLogger(__name__)
TASK = "segmentation"
CPU_CROP = 256
"""Largest crop side that training on a CPU does not warn about (with ``fcaformer_l1``)."""

__all__ = ["SegmentTrainConfig", "class_names_of", "evaluate_segmentor", "infer", "load_segmentor", "palette",
           "predict_files", "read_class_names", "scores_from_confusion", "train_segmentor"]


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
    """Train UperNet on an ADE20K-format folder pair; writes training states (resumable) and ``model.pt``.

    Returns ``{"losses": [...], "metrics": {...} (with a validation set), "checkpoint": path}``. Under
    torchrun each rank trains on its shard (DDP; gloo on CPU); rank 0 writes files and evaluates.
    """
    check_builder_kwargs(config.backbone_mode, config.backbone_kwargs)
    for side in config.crop_size:
        if side % SIZE_DIVISOR:
            raise ValueError(f"crop_size sides must be multiples of {SIZE_DIVISOR}, got {config.crop_size}")
    if config.class_names is not None and len(config.class_names) != config.num_classes:
        raise ValueError(f"{len(config.class_names)} class names for {config.num_classes} classes: give one name per "
                         "class (after --reduce-zero-label), in label order")

    @functools.cache  # scanned once, at the first validation
    def val_set() -> SegmentationFolder:
        return SegmentationFolder(config.val_img_dir, config.val_ann_dir, config.num_classes,
                                  reduce_zero_label=config.reduce_zero_label, min_usable=config.min_usable)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        test_size = config.base_size if config.val_test_size is None else config.val_test_size
        return evaluate_segmentor(model, val_set(), mode=config.val_mode, test_size=test_size,
                                  crop_size=config.crop_size, show_progress=show_progress)

    heavy = config.variant != "fcaformer_l1" or max(config.crop_size) > CPU_CROP
    return train_dense_task(
        config, TASK,
        make_dataset=lambda: SegmentationFolder(config.img_dir, config.ann_dir, config.num_classes,
                                                reduce_zero_label=config.reduce_zero_label, train=True,
                                                base_size=config.base_size, scale_range=config.scale_range,
                                                crop_size=config.crop_size, min_usable=config.min_usable,
                                                progress=show_progress),
        builder_for=lambda dataset: builder_kwargs(config),
        build_model=upernet,
        trunk_of=segmentor_trunk,
        meta_for=lambda dataset: dict(class_names=config.class_names, reduce_zero_label=config.reduce_zero_label),
        loss_fn=segmentation_loss,
        # a one-image remainder batch fails BatchNorm after the decoder's 1x1 pyramid pooling
        drop_last=True,
        evaluate=evaluate if config.val_img_dir and config.val_ann_dir else None,
        metric_names=("mIoU", "pixel_acc"),
        describe=f"UperNet, crops {config.crop_size[0]}x{config.crop_size[1]} from shorter side {config.base_size}",
        cpu_advice=(f"training {config.variant} on {config.crop_size[0]}x{config.crop_size[1]} crops on the CPU is "
                    "slow (watch the rate in the progress bar). For a first run on a CPU, use a small model and "
                    f"input: --model fcaformer_l1 --crop-size {CPU_CROP} --base-size {CPU_CROP} --decoder-channels "
                    "128 --batch-size 4 (see docs/segmentation.md, 'On a CPU')") if heavy else None,
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
    """mIoU, pixel accuracy and per-class IoU (see :func:`scores_from_confusion`) over ``dataset`` (whole
    images, label 255 ignored) from torchmetrics' multiclass confusion matrix, and ``images``: how many were
    evaluated. Pairs that fail to load are left out, logged and listed in ``skipped_when_loaded``."""
    # one process evaluates the whole set (under DDP training: rank 0 alone), so no gather across ranks: it would
    # wait for ranks that are training on
    confusion = MulticlassConfusionMatrix(dataset.num_classes, ignore_index=IGNORE_INDEX, sync_on_compute=False)
    failed: list[str] = []
    for index in tqdm(range(len(dataset)), desc="eval", disable=not show_progress, dynamic_ncols=True):
        try:
            image, label = dataset.load(index)
        except SampleError as error:
            log.warning("evaluation skips an image that cannot be loaded: %s", error)
            failed.append(str(error))
            continue
        logits = infer(model, normalize(image), mode, crop_size, test_size=test_size)
        confusion.update(logits.argmax(0).flatten(), label.flatten())
    if len(failed) == len(dataset):
        raise ValueError(f"none of the {len(dataset)} images in {dataset.img_dir} can be loaded (e.g. {failed[0]})")
    return {**scores_from_confusion(confusion.compute()), "images": len(dataset) - len(failed),
            "skipped_when_loaded": failed}


def blend(image: torch.Tensor, prediction: torch.Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: the class colours over the image with opacity ``alpha``."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.float32)
    mask = colours[prediction.numpy()].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * mask).round().clip(0, 255).astype(np.uint8)


def read_class_names(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Class names from a text file, one a line (blank lines ignored); with ``num_classes``, a file with another
    number of names is refused (``ValueError``)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"class names file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise ValueError(f"class names file {path} is not a text file ({error})") from error
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{path} has {len(names)} class names but --num-classes is {num_classes}: give one name "
                         "per class (after --reduce-zero-label), in label order")
    return names


def class_names_of(raw: Mapping[str, Any]) -> list[str]:
    """The class names stored in a segmentation checkpoint, or ``"class <i>"`` when it has none."""
    names = raw.get("class_names")
    return list(names) if names else [f"class {i}" for i in range(raw["builder"]["num_classes"])]


def plot_legend(class_names: Sequence[str], classes: Sequence[int], path: str | os.PathLike) -> Path:
    """A PNG legend: the palette colour and name of each of ``classes``."""
    from matplotlib.patches import Patch

    plt = pyplot()
    colours = palette(len(class_names)) / 255
    handles = [Patch(facecolor=colours[c], edgecolor="black", label=f"{c}: {class_names[c]}") for c in classes]
    fig = plt.figure(figsize=(3.2, 0.3 * len(handles) + 0.4))
    fig.legend(handles=handles, loc="center", frameon=False)
    return save_figure(fig, path)


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  num_classes: int, mode: str = "whole", crop_size: Sequence[int] = (512, 512),
                  alpha: float = 0.5, test_size: int = 0, show_progress: bool = True,
                  class_names: Sequence[str] | None = None) -> list[Path]:
    """Segment image files and folders (a folder: the images in it); returns the overlays' paths.

    Writes into ``out_dir``, for each input, ``<name>.png`` (class colours blended over the image) and
    ``<name>_labels.png`` (class indices), where ``<name>`` is the file stem, or the path relative to the
    inputs' common folder when two inputs share a stem; then ``legend.png`` (colour and name of each class
    predicted) and ``predictions.json`` (for each input its outputs and the fraction of pixels of each class,
    by name; inputs that could not be read with their ``error``).
    """
    out_dir = Path(out_dir)
    names = list(class_names) if class_names else [f"class {i}" for i in range(num_classes)]
    colours = palette(num_classes)
    written = []
    records: list[dict[str, Any]] = []
    seen: set[int] = set()
    inputs = PredictInputs(paths, (".png", "_labels.png"), log, show_progress)
    for item in inputs:
        prediction = infer(model, normalize(item.image), mode, crop_size, test_size=test_size).argmax(0)
        overlay = Image.fromarray(blend(item.image, prediction, colours, alpha))
        labels = Image.fromarray(prediction.numpy().astype(np.uint8), mode="L")
        overlay_path = atomic_write(out_dir / f"{item.stem}.png", lambda h, p=overlay: p.save(h, format="PNG"))
        labels_path = atomic_write(out_dir / f"{item.stem}_labels.png", lambda h, p=labels: p.save(h, format="PNG"))
        written.append(overlay_path)
        counts = torch.bincount(prediction.flatten(), minlength=num_classes)
        present = [int(c) for c in torch.nonzero(counts).flatten()]
        seen.update(present)
        records.append({"image": portable_path(str(item.path)), "overlay": overlay_path.relative_to(out_dir).as_posix(),
                        "labels": labels_path.relative_to(out_dir).as_posix(),
                        "class_fractions": {names[c]: round(float(counts[c]) / prediction.numel(), 6)
                                            for c in present}})
    if seen:
        plot_legend(names, sorted(seen), out_dir / "legend.png")
    atomic_json_dump(records + inputs.failed, out_dir / "predictions.json")
    return written
