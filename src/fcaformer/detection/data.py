"""COCO-format instance datasets for detection: validated loading, counted skips, boxes + masks as tensors."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)

BACKGROUND_NAMES = ("_background_", "background", "__background__")
"""Category names treated as the implicit background (label 0) rather than as object classes."""


class AnnotationError(ValueError):
    """An annotation file that cannot be used (missing, not JSON, wrong structure)."""


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check a COCO instances file; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path} (pass the COCO instances .json with --ann)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"annotation file {path}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(
                f"annotation file {path}: missing or non-list {key!r}; expected COCO instances format "
                "with 'images', 'annotations' and 'categories' lists"
            )
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not {"id", "file_name", "height", "width"} <= image.keys():
            raise AnnotationError(f"annotation file {path}: images[{i}] lacks id/file_name/height/width: {image}")
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not {"id", "name"} <= category.keys():
            raise AnnotationError(f"annotation file {path}: categories[{i}] lacks id/name: {category}")
    return data


@dataclass
class SkipCounter:
    """Counts of what was dropped while loading, with one log line per reason at the end."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, detail: str) -> None:
        if not self.counts[reason]:
            log.warning("skipping %s (first case: %s); further cases are counted", reason, detail)
        self.counts[reason] += 1

    def report(self, what: str) -> None:
        if self.counts:
            log.warning("%s: skipped %s", what, ", ".join(f"{n} {reason}" for reason, n in self.counts.items()))


def _to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list / RLE into a (H, W) uint8 mask."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoDetection(Dataset):
    """A COCO instances dataset for torchvision detectors.

    Category ids are mapped to contiguous labels ``1..K`` in id order (0 is the background; a category named
    ``_background_`` / ``background`` is not a class). Problems are skipped, logged and counted in
    ``self.skipped`` (a :class:`~collections.Counter`): unreadable or missing images, images whose size differs
    from the annotation, annotations with unknown category ids, boxes entirely outside the image or of zero
    area (boxes partly outside are clipped), crowd annotations (for training targets only; evaluation keeps
    them in the ground truth), and malformed segmentations.

    Args:
        root: folder the ``file_name`` entries are relative to.
        ann_file: COCO instances json.
        masks: also return instance masks (Mask R-CNN).
        train: random horizontal flips.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, masks: bool = True,
                 train: bool = False) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.masks = masks
        self.train = train
        data = read_coco_json(ann_file)
        skips = SkipCounter()
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = [c for c in categories if c["name"] not in BACKGROUND_NAMES]
        if not self.categories:
            raise AnnotationError(f"annotation file {ann_file}: no object categories")
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat = {label: cat for cat, label in self.cat_to_label.items()}
        self.class_names = ["__background__", *(c["name"] for c in self.categories)]

        images: dict[int, dict[str, Any]] = {}
        for image in data["images"]:
            path = self.root / image["file_name"]
            try:
                with Image.open(path) as handle:
                    size = handle.size
            except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
                skips.add("unreadable images", f"{path}: {error}")
                continue
            if size != (image["width"], image["height"]):
                skips.add("images whose size differs from the annotation",
                          f"{path} is {size[0]}x{size[1]}, annotation says {image['width']}x{image['height']}")
                continue
            images[image["id"]] = {**image, "path": path, "anns": []}

        self.gt_annotations: list[dict[str, Any]] = []  # cleaned ground truth for COCO evaluation
        for ann in data["annotations"]:
            image = images.get(ann.get("image_id"))
            if image is None:
                skips.add("annotations of unknown or skipped images", str(ann.get("image_id")))
                continue
            if ann.get("category_id") not in self.cat_to_label:
                skips.add("annotations with unknown category ids",
                          f"category_id {ann.get('category_id')} (annotation {ann.get('id')})")
                continue
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                skips.add("annotations with a malformed bbox", f"annotation {ann.get('id')}: bbox={box}")
                continue
            x, y, w, h = box
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
            if x2 <= x1 or y2 <= y1:
                skips.add("zero-area boxes or boxes outside the image", f"annotation {ann.get('id')}: bbox={box}")
                continue
            if masks and not ann.get("iscrowd", 0) and "segmentation" not in ann:
                skips.add("annotations without a segmentation", f"annotation {ann.get('id')}")
                continue
            clean = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(ann.get("iscrowd", 0)),
                     "area": float(ann.get("area", (x2 - x1) * (y2 - y1))),
                     "id": len(self.gt_annotations) + 1}
            self.gt_annotations.append(clean)
            if not clean["iscrowd"]:
                image["anns"].append(clean)
        self.images = list(images.values())
        if not self.images:
            raise AnnotationError(f"no usable images in {ann_file} under {self.root}: {dict(skips.counts)}")
        self.skipped = skips.counts
        skips.report(f"{ann_file}")

    def __len__(self) -> int:
        return len(self.images)

    def coco_ground_truth(self) -> dict[str, Any]:
        """The cleaned ground truth as a COCO dict (for ``pycocotools.coco.COCO``)."""
        return {
            "images": [{k: image[k] for k in ("id", "file_name", "height", "width")} for image in self.images],
            "annotations": [{k: v for k, v in ann.items() if k != "segmentation" or self.masks}
                            for ann in self.gt_annotations],
            "categories": self.categories,
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.images[index]
        pixels = TF.to_image(Image.open(image["path"]).convert("RGB"))
        height, width = image["height"], image["width"]
        anns = image["anns"]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image["id"],
        }
        if self.masks:
            masks = np.stack([_to_mask(a["segmentation"], height, width) for a in anns]) if anns else \
                np.zeros((0, height, width), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.train:
            pixels, target = v2.RandomHorizontalFlip()(pixels, target)
        pixels = TF.to_dtype(pixels, torch.float32, scale=True)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        if self.masks:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        return pixels.as_subclass(torch.Tensor), target


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Lists of images and targets (torchvision detectors take variable-size images)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
