"""Train, evaluate (COCO box / mask AP with pycocotools) and run detectors on images."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from ..io import atomic_json_dump, atomic_write, path_label
from .data import CocoDetection, collate
from .model import build_detector
from .training import DenseTrainConfig, load_task_model, train_dense_task

log = logging.getLogger(__name__)
TASK = "detection"
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(kw_only=True)
class DetectTrainConfig(DenseTrainConfig):
    """Everything ``fcaformer detect train`` needs (keywords only); stored in the checkpoints."""

    data_root: str
    ann_file: str
    arch: str = "mask_rcnn"
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    val_root: str | None = None
    val_ann_file: str | None = None


def builder_kwargs(config: DetectTrainConfig, num_classes: int) -> dict[str, Any]:
    """Arguments of :func:`~fcaformer.detection.model.build_detector` for a config (weights not included)."""
    return dict(arch=config.arch, variant=config.variant, num_classes=num_classes,
                backbone_mode=config.backbone_mode, backbone_kwargs=dict(config.backbone_kwargs),
                min_size=tuple(config.min_size), max_size=config.max_size, **config.detector_kwargs)


def detection_loss(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """torchvision detectors return their loss dict in train mode."""
    images, targets = batch
    device = next(model.parameters()).device
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return model(images, targets)


def train_detector(config: DetectTrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train on a COCO-format dataset; writes ``last.pt`` (resumable) and ``model.pt`` into ``out_dir``.

    Returns ``{"losses": [...], "metrics": {...} (when a validation set is given), "checkpoint": path}``.
    Under torchrun each rank trains on its shard (DDP, gloo on CPU); rank 0 writes files and evaluates.
    """
    masks = config.arch == "mask_rcnn"

    def evaluate(model: nn.Module) -> dict[str, float]:
        val = CocoDetection(config.val_root or config.data_root, config.val_ann_file, masks=masks)
        return evaluate_detector(model, val, show_progress=show_progress)

    return train_dense_task(
        config, TASK,
        make_dataset=lambda: CocoDetection(config.data_root, config.ann_file, masks=masks, train=True),
        builder_for=lambda dataset: builder_kwargs(config, len(dataset.class_names)),
        build_model=build_detector,
        trunk_of=lambda model: model.backbone.body.trunk,
        meta_for=lambda dataset: dict(class_names=dataset.class_names, label_to_cat=dataset.label_to_cat),
        loss_fn=detection_loss, collate_fn=collate,
        evaluate=evaluate if config.val_ann_file else None,
        show_progress=show_progress,
    )


def load_detector(path: str | os.PathLike | Mapping[str, Any], device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a detector from a checkpoint of :func:`train_detector`; returns ``(model in eval mode, raw)``."""
    return load_task_model(path, TASK, build_detector, device)


def _encode_mask(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Eval-mode detections for float ``(3, H, W)`` images in [0, 1] (boxes in input pixels)."""
    model.eval()
    device = next(model.parameters()).device
    return [{k: v.cpu() for k, v in out.items()} for out in model([image.to(device) for image in images])]


def evaluate_detector(model: nn.Module, dataset: CocoDetection, batch_size: int = 2,
                      show_progress: bool = True) -> dict[str, float]:
    """COCO box (and, for Mask R-CNN, mask) AP on ``dataset`` with pycocotools.

    Returns ``bbox_AP``, ``bbox_AP50``, ... and ``segm_AP``, ... (in [0, 1]; -1 where COCO defines none).
    """
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    results: list[dict[str, Any]] = []
    with_masks = dataset.masks
    for images, targets in tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True):
        for out, target in zip(detect(model, images), targets, strict=True):
            boxes = out["boxes"].numpy()
            masks = (out["masks"][:, 0] > 0.5).numpy() if with_masks and "masks" in out else None
            for i, (box, score, label) in enumerate(zip(boxes, out["scores"].tolist(), out["labels"].tolist(),
                                                        strict=True)):
                entry = {"image_id": target["image_id"], "category_id": dataset.label_to_cat[label],
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                         "score": float(score)}
                if masks is not None:
                    entry["segmentation"] = _encode_mask(masks[i])
                results.append(entry)
    iou_types = ["bbox", "segm"] if with_masks else ["bbox"]
    metrics = {f"{t}_{name}": 0.0 for t in iou_types for name in METRIC_NAMES}
    if not results:
        log.warning("the detector returned no detections: AP is 0")
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset.coco_ground_truth()
        gt.createIndex()
        dt = gt.loadRes(results)
    for iou_type in iou_types:
        evaluator = COCOeval(gt, dt, iou_type)
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        log.info("COCO %s:\n%s", iou_type, summary.getvalue())
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(METRIC_NAMES, evaluator.stats,
                                                                              strict=False)})
    return metrics


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image as a float ``(3, H, W)`` tensor in [0, 1]; clear error for missing / unreadable files."""
    try:
        with Image.open(path) as handle:
            return TF.to_dtype(TF.to_image(handle.convert("RGB")), torch.float32, scale=True).as_subclass(
                torch.Tensor)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path} as an image ({error}); pass JPEG/PNG files") from error


def draw_detections(image: torch.Tensor, detections: Mapping[str, torch.Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.5) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` picture with the detections above ``score_threshold``: masks, boxes, labels."""
    keep = detections["scores"] >= score_threshold
    picture = (image * 255).round().to(torch.uint8)
    if "masks" in detections and keep.any():
        picture = draw_segmentation_masks(picture, detections["masks"][keep, 0] > 0.5, alpha=0.45)
    labels = [f"{class_names[int(label)]} {float(score):.2f}"
              for label, score in zip(detections["labels"][keep], detections["scores"][keep], strict=True)]
    if labels:
        picture = draw_bounding_boxes(picture, detections["boxes"][keep], labels=labels, width=3)
    return picture


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  class_names: Sequence[str], label_to_cat: Mapping[int, int] | None = None,
                  score_threshold: float = 0.5, show_progress: bool = True) -> list[Path]:
    """Detect on image files; writes ``<stem>.png`` drawings and ``predictions.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    records = []
    for path in tqdm(paths, desc="predict", disable=not show_progress, dynamic_ncols=True):
        image = read_image(path)
        out = detect(model, [image])[0]
        picture = Image.fromarray(draw_detections(image, out, class_names, score_threshold).permute(1, 2, 0)
                                  .numpy())
        target = out_dir / f"{Path(path).stem}.png"
        written.append(atomic_write(target, lambda handle, p=picture: p.save(handle, format="PNG")))
        keep = out["scores"] >= score_threshold
        records.append({"image": path_label(path), "detections": [
            {"label": class_names[int(lb)], "category_id": (label_to_cat or {}).get(int(lb), int(lb)),
             "score": float(s), "box_xyxy": [float(v) for v in b]}
            for b, s, lb in zip(out["boxes"][keep], out["scores"][keep], out["labels"][keep], strict=True)]})
    atomic_json_dump(records, out_dir / "predictions.json")
    return written
