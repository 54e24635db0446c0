"""Train, evaluate (COCO box / mask AP with pycocotools) and run detectors on images."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from ..files import atomic_json_dump, atomic_write, portable_path
from .data import CocoDetection, collate
from .inputs import PredictInputs, SkippingCollate, SkipUnloadable, palette
from .model import build_detector, check_builder_kwargs
from .training import DenseTrainConfig, load_task_model, train_dense_task

log = logging.getLogger(__name__)
TASK = "detection"
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
CPU_MIN_SIZE = 320
"""Largest ``--min-size`` that training on a CPU does not warn about (with ``fcaformer_l1``)."""


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
    """Train on a COCO-format dataset; writes training states (resumable) and ``model.pt`` into ``out_dir``.

    Returns ``{"losses": [...], "metrics": {...} (when a validation set is given), "checkpoint": path}``.
    Under torchrun each rank trains on its shard (DDP, gloo on CPU); rank 0 writes files and evaluates.
    """
    check_builder_kwargs(config.backbone_mode, config.backbone_kwargs, config.arch, config.detector_kwargs)
    masks = config.arch == "mask_rcnn"

    @functools.cache  # read once, at the first validation
    def val_set() -> CocoDetection:
        return CocoDetection(config.val_root or config.data_root, config.val_ann_file, masks=masks,
                             min_usable=config.min_usable, progress=show_progress)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return evaluate_detector(model, val_set(), show_progress=show_progress)

    sizes = "/".join(map(str, config.min_size))
    heavy = config.variant != "fcaformer_l1" or max(config.min_size) > CPU_MIN_SIZE
    return train_dense_task(
        config, TASK,
        make_dataset=lambda: CocoDetection(config.data_root, config.ann_file, masks=masks, train=True,
                                           min_usable=config.min_usable, progress=show_progress),
        builder_for=lambda dataset: builder_kwargs(config, len(dataset.class_names)),
        build_model=build_detector,
        trunk_of=lambda model: model.backbone.body.trunk,
        meta_for=lambda dataset: dict(class_names=dataset.class_names, label_to_cat=dataset.label_to_cat),
        loss_fn=detection_loss, collate_fn=collate,
        evaluate=evaluate if config.val_ann_file else None,
        metric_names=("bbox_AP", "bbox_AP50", "segm_AP") if masks else ("bbox_AP", "bbox_AP50"),
        describe=f"{config.arch}, shorter side {sizes}, longer side <= {config.max_size}",
        cpu_advice=(f"training {config.variant} at shorter side {sizes} on the CPU is slow (each iteration can "
                    "take many seconds: watch the rate in the progress bar). For a first run on a CPU, use a small "
                    f"model and input: --model fcaformer_l1 --min-size {CPU_MIN_SIZE} --max-size 512, and narrow "
                    "heads with --detector-kwargs (see docs/detection.md, 'On a CPU')") if heavy else None,
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


def coco_results(out: Mapping[str, torch.Tensor], image_id: int, label_to_cat: Mapping[int, int],
                 score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """Detections of one image as COCO result entries: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h),
    ``score`` and, for Mask R-CNN, ``segmentation`` (the mask thresholded at 0.5, as COCO RLE)."""
    keep = out["scores"] >= score_threshold
    masks = (out["masks"][keep, 0] > 0.5).numpy() if "masks" in out else None
    entries = []
    for i, (box, score, label) in enumerate(zip(out["boxes"][keep].tolist(), out["scores"][keep].tolist(),
                                                out["labels"][keep].tolist(), strict=True)):
        entry = {"image_id": image_id, "category_id": label_to_cat.get(label, label),
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
        if masks is not None:
            entry["segmentation"] = _encode_mask(masks[i])
        entries.append(entry)
    return entries


def _per_class_ap(evaluator: COCOeval) -> dict[int, float | None]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category id; ``None`` where it has no ground truth
    and no detections (COCO marks those -1)."""
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, categories, areas, max dets)
    result: dict[int, float | None] = {}
    for k, cat in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        result[cat] = float(values.mean()) if values.size else None
    return result


def evaluate_detector(model: nn.Module, dataset: CocoDetection, batch_size: int = 2,
                      show_progress: bool = True) -> dict[str, Any]:
    """COCO box (and, for Mask R-CNN, mask) AP on ``dataset`` with pycocotools.

    Returns ``bbox_AP``, ``bbox_AP50``, ... and ``segm_AP``, ... (in [0, 1]; -1 where COCO defines none),
    ``bbox_per_class_AP`` (and ``segm_per_class_AP``): one AP a class in the order of ``class_names``
    (``None`` for a class without ground truth or detections), and ``images``: how many were evaluated.
    Images that fail to load are left out of the evaluation (and its ground truth), logged, and listed in
    ``skipped_when_loaded``.
    """
    loader = DataLoader(SkipUnloadable(dataset, substitute=False), batch_size=batch_size,
                        collate_fn=SkippingCollate(collate))
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    excluded: set[int] = set()
    for batch in tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True):
        for error in batch.errors:
            log.warning("evaluation skips an image that cannot be loaded: %s", error)
        failed.extend(batch.errors)
        excluded.update(dataset.images[i]["id"] for i in batch.dropped)
        if batch.data is None:
            continue
        images, targets = batch.data
        for out, target in zip(detect(model, images), targets, strict=True):
            results.extend(coco_results(out, target["image_id"], dataset.label_to_cat))
    iou_types = ["bbox", "segm"] if dataset.masks else ["bbox"]
    metrics: dict[str, Any] = {f"{t}_{name}": 0.0 for t in iou_types for name in METRIC_NAMES}
    ground_truth = dataset.coco_ground_truth(exclude=excluded)
    with_gt = {ann["category_id"] for ann in ground_truth["annotations"]}
    for t in iou_types:  # what AP is without detections: 0 for the classes that have ground truth
        metrics[f"{t}_per_class_AP"] = [0.0 if c["id"] in with_gt else None for c in dataset.categories]
    metrics.update(class_names=dataset.class_names[1:], images=len(dataset) - len(excluded),
                   skipped_when_loaded=failed)
    if not ground_truth["images"]:
        raise ValueError(f"none of the {len(dataset)} images of {dataset.ann_file} can be loaded (e.g. {failed[0]})")
    if not results:
        log.warning("the detector returned no detections: AP is 0")
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
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
        per_class = _per_class_ap(evaluator)
        metrics[f"{iou_type}_per_class_AP"] = [per_class.get(c["id"]) for c in dataset.categories]
    return metrics


def draw_labels(picture: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str],
                colours: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Each label on a filled rectangle of its box's colour, above the box's top-left corner (inside the box when
    there is no room above), in black or white, whichever contrasts more with the fill: readable where boxes and
    masks overlap. ``picture``: uint8 ``(3, H, W)``; returns a new one."""
    image = Image.fromarray(picture.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(11, min(image.size) // 40))
    for box, text, colour in zip(boxes.tolist(), labels, colours, strict=True):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 4, bottom - top + 4
        x = min(max(int(box[0]), 0), max(image.width - width, 0))
        y = int(box[1]) - height if int(box[1]) >= height else max(int(box[1]), 0)
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=(0, 0, 0) if luminance > 128 else (255, 255, 255))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def draw_detections(image: torch.Tensor, detections: Mapping[str, torch.Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.5) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` picture with the detections above ``score_threshold``: masks, boxes and
    ``"<class name> <score>"`` labels (see :func:`draw_labels`), one colour a class (the VOC colour map)."""
    keep = detections["scores"] >= score_threshold
    picture = (image * 255).round().to(torch.uint8)
    table = palette(len(class_names))
    colours = [tuple(int(v) for v in table[int(label)]) for label in detections["labels"][keep]]
    if "masks" in detections and keep.any():
        picture = draw_segmentation_masks(picture, detections["masks"][keep, 0] > 0.5, alpha=0.45, colors=colours)
    labels = [f"{class_names[int(label)]} {float(score):.2f}"
              for label, score in zip(detections["labels"][keep], detections["scores"][keep], strict=True)]
    if labels:
        picture = draw_bounding_boxes(picture, detections["boxes"][keep], colors=colours, width=3)
        picture = draw_labels(picture, detections["boxes"][keep], labels, colours)
    return picture


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  class_names: Sequence[str], label_to_cat: Mapping[int, int] | None = None,
                  score_threshold: float = 0.5, show_progress: bool = True) -> list[Path]:
    """Detect on image files and folders (a folder: the images in it); writes a ``<name>.png`` drawing for each
    and ``predictions.json`` into ``out_dir``; returns the drawings' paths.

    ``<name>`` is the file stem, or the path relative to the inputs' common folder when two inputs share a
    stem. ``predictions.json`` lists, for each input, its ``output`` and its detections above
    ``score_threshold`` (``label``, ``category_id``, ``score``, ``box_xyxy``, COCO ``bbox`` and, for Mask R-CNN,
    the mask as COCO RLE in ``segmentation``); inputs that could not be read are listed with their ``error``.
    """
    out_dir = Path(out_dir)
    inputs = PredictInputs(paths, (".png",), log, show_progress)
    written: list[Path] = []
    records: list[dict[str, Any]] = []
    for item in inputs:
        out = detect(model, [item.image])[0]
        picture = Image.fromarray(draw_detections(item.image, out, class_names, score_threshold).permute(1, 2, 0)
                                  .numpy())
        target = atomic_write(out_dir / f"{item.stem}.png", lambda handle, p=picture: p.save(handle, format="PNG"))
        written.append(target)
        keep = out["scores"] >= score_threshold
        entries = coco_results(out, 0, label_to_cat or {}, score_threshold)
        for entry, label, box in zip(entries, out["labels"][keep].tolist(), out["boxes"][keep].tolist(),
                                     strict=True):
            del entry["image_id"]
            entry.update(label=class_names[label], box_xyxy=box)
        # portable records: the input as given (fcaformer.files.portable_path), the drawing relative to out_dir
        records.append({"image": portable_path(str(item.path)), "output": target.relative_to(out_dir).as_posix(),
                        "height": item.image.shape[1], "width": item.image.shape[2], "detections": entries})
    atomic_json_dump(records + inputs.failed, out_dir / "predictions.json")
    return written
