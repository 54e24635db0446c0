"""COCO-format instance datasets for detection: validated loading, counted skips, boxes + masks as tensors.

:class:`SkipCounter` and :func:`require_usable` are shared with the segmentation datasets."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .inputs import DataCheckError, SampleError, open_rgb, probe_image

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
    """What was dropped while a dataset was read: a count and every case per reason.

    The first case of each reason is logged at once (so a user watching the log sees it early), the rest are
    counted and named in :meth:`summary` / :meth:`report`.
    """

    logger: logging.Logger = log
    details: dict[str, list[str]] = field(default_factory=dict)

    @property
    def counts(self) -> Counter:
        """How many cases each reason has."""
        return Counter({reason: len(cases) for reason, cases in self.details.items()})

    def add(self, reason: str, detail: str) -> None:
        if reason not in self.details:
            self.logger.warning("skipping %s (first case: %s); further cases are counted", reason, detail)
        self.details.setdefault(reason, []).append(detail)

    def summary(self, examples: int = 3) -> str:
        """``"2 unreadable images (a.jpg: ..., b.jpg: ...), 1 ..."`` naming up to ``examples`` cases a reason."""
        parts = []
        for reason, count in self.counts.items():
            shown = self.details[reason][:examples]
            more = f"; {count - len(shown)} more" if count > len(shown) else ""
            parts.append(f"{count} {reason} ({'; '.join(shown)}{more})")
        return ", ".join(parts)

    def report(self, what: str) -> None:
        if self.counts:
            self.logger.warning("%s: skipped %s", what, self.summary())


def require_usable(what: str, usable: int, total: int, min_usable: float, skips: SkipCounter, fix: str = "") -> None:
    """Raise :class:`DataCheckError` when fewer than ``min_usable`` of ``total`` items survived the checks.

    ``what`` names the items (``"images in a.json"``), ``fix`` is appended to the message (what to change).
    """
    if total and usable < min_usable * total:
        reasons = f": skipped {skips.summary()}" if skips.counts else ""
        raise DataCheckError(f"only {usable} of {total} {what} are usable{reasons}. {fix} To go on with the "
                             f"usable part, lower --min-usable (now {min_usable}).".replace("  ", " "))


def _rle_counts(text: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (the format of pycocotools' ``rleFrString``).

    pycocotools decodes without bounds checks, so a damaged string must be caught before it gets there.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            if position >= len(text):
                raise ValueError("RLE counts string ends inside a number")
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << 5 * shift
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << 5 * shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def check_segmentation(segmentation: Any, height: int, width: int) -> tuple[Any, bool]:
    """A COCO ``segmentation`` in a form pycocotools decodes safely, and whether it was a flat polygon.

    Polygons: a list of lists of at least 6 finite coordinates (an even count); a flat list ``[x, y, ...]``
    (a common export error) is read as one polygon. RLE: ``size`` equal to the image's and run lengths that
    cover it exactly. Raises ``ValueError`` saying what is wrong.
    """
    if isinstance(segmentation, list):
        flat = bool(segmentation) and all(isinstance(v, (int, float)) for v in segmentation)
        polygons = [segmentation] if flat else segmentation
        if not polygons:
            raise ValueError("empty polygon list")
        for polygon in polygons:
            if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                        for v in polygon):
                raise ValueError(f"polygon is not a list of finite numbers: {str(polygon)[:60]}")
            if len(polygon) < 6 or len(polygon) % 2:
                raise ValueError(f"polygon has {len(polygon)} coordinates; needs an even number, at least 6")
        return polygons, flat
    if not isinstance(segmentation, dict) or not {"size", "counts"} <= segmentation.keys():
        raise ValueError(f"neither polygons nor an RLE dict with size and counts: {str(segmentation)[:60]}")
    size, counts = segmentation["size"], segmentation["counts"]
    if list(size) != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
    if isinstance(counts, str):
        runs = _rle_counts(counts)
    elif isinstance(counts, list) and all(isinstance(v, int) for v in counts):
        runs = counts
    else:
        raise ValueError("RLE counts must be a string or a list of integers")
    if any(v < 0 for v in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE run lengths cover {sum(runs)} pixels, the image has {height * width}")
    return {"size": [height, width], "counts": counts}, False


def _to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a segmentation checked by :func:`check_segmentation` into a (H, W) uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoDetection(Dataset):
    """A COCO instances dataset for torchvision detectors.

    Category ids are mapped to contiguous labels ``1..K`` in id order (0 is the background; a category named
    ``_background_`` / ``background`` is not a class).

    Damaged data is skipped, logged, named and counted in ``self.skipped`` (a :class:`~collections.Counter`)
    and ``self.skip_details`` (every case per reason) while the file is read: missing, unreadable or truncated
    images (header and end marker are checked, see :func:`~fcaformer.detection.inputs.probe_image`), images
    whose size differs from the annotation, annotations with unknown category ids or of unknown images, boxes
    that are not four finite numbers, entirely outside the image or of zero area (boxes partly outside are
    clipped), and, with ``masks``, annotations without a segmentation or with malformed polygons / RLE. A flat
    polygon list ``[x, y, ...]`` is read as one polygon, logged and listed in ``self.flat_polygons``. Crowd
    annotations stay in the evaluation ground truth but are not training targets. An image that fails to
    decode later raises :class:`~fcaformer.detection.inputs.SampleError` naming it (training and evaluation
    skip it).

    Raises :class:`AnnotationError` when no annotation is usable (e.g. category ids that do not match; the
    message says which) and :class:`~fcaformer.detection.inputs.DataCheckError` when fewer than ``min_usable``
    of the images or annotations are.

    Args:
        root: folder the ``file_name`` entries are relative to.
        ann_file: COCO instances json.
        masks: also return instance masks (Mask R-CNN).
        train: random horizontal flips.
        min_usable: smallest usable fraction of the images and of the annotations (0: only require one).
        progress: show a progress bar while the images are checked.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, masks: bool = True,
                 train: bool = False, min_usable: float = 0.5, progress: bool = False) -> None:
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
        for image in tqdm(data["images"], desc="checking images", disable=not progress, dynamic_ncols=True):
            path = self.root / image["file_name"]
            try:
                size, _ = probe_image(path)
            except SampleError as error:
                skips.add("unreadable images", str(error))
                continue
            if size != (image["width"], image["height"]):
                skips.add("images whose size differs from the annotation",
                          f"{path} is {size[0]}x{size[1]}, annotation says {image['width']}x{image['height']}")
                continue
            images[image["id"]] = {**image, "path": path, "anns": []}

        self.gt_annotations: list[dict[str, Any]] = []  # cleaned ground truth for COCO evaluation
        self.flat_polygons: list[Any] = []  # ids of annotations whose polygon was a flat list (kept)
        for ann in data["annotations"]:
            clean = self._clean(ann, images, skips)
            if clean is not None:
                clean["id"] = len(self.gt_annotations) + 1
                self.gt_annotations.append(clean)
                if not clean["iscrowd"]:
                    images[clean["image_id"]]["anns"].append(clean)
        self.images = list(images.values())
        self.listed = len(data["images"])  # before the checks
        self.skipped = skips.counts
        self.skip_details = skips.details
        skips.report(f"{ann_file}")
        if self.flat_polygons:
            log.warning("%s: %d segmentations are a flat list [x, y, ...] instead of a list of polygons "
                        "[[x, y, ...]]; each was read as one polygon (annotation ids %s)", ann_file,
                        len(self.flat_polygons), ", ".join(map(str, self.flat_polygons[:10])))
        self._require_usable(data, skips, min_usable)

    def _clean(self, ann: Any, images: dict[int, dict[str, Any]], skips: SkipCounter) -> dict[str, Any] | None:
        """The annotation with its box clipped and segmentation checked, or ``None`` (counted in ``skips``)."""
        if not isinstance(ann, dict):
            skips.add("annotations that are not JSON objects", str(ann)[:60])
            return None
        name = f"annotation {ann.get('id')}"
        image = images.get(ann.get("image_id"))
        if image is None:
            skips.add("annotations of unknown or skipped images", f"{name}: image_id {ann.get('image_id')}")
            return None
        if ann.get("category_id") not in self.cat_to_label:
            skips.add("annotations with unknown category ids", f"{name}: category_id {ann.get('category_id')}")
            return None
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            skips.add("annotations with a malformed bbox", f"{name}: bbox={box}")
            return None
        x, y, w, h = box
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
        if x2 <= x1 or y2 <= y1:
            skips.add("zero-area boxes or boxes outside the image", f"{name}: bbox={box}")
            return None
        clean = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(bool(ann.get("iscrowd", 0))),
                 "area": float(ann.get("area", (x2 - x1) * (y2 - y1)))}
        if self.masks:
            if "segmentation" not in ann:
                skips.add("annotations without a segmentation", name)
                return None
            try:
                clean["segmentation"], flat = check_segmentation(ann["segmentation"], image["height"],
                                                                 image["width"])
            except ValueError as error:
                skips.add("annotations with a malformed segmentation", f"{name} of {image['path']}: {error}")
                return None
            if flat:  # usable, but the exporter that wrote it has a bug the user should know about
                self.flat_polygons.append(ann.get("id"))
        return clean

    def _require_usable(self, data: dict[str, Any], skips: SkipCounter, min_usable: float) -> None:
        where = f"annotation file {self.ann_file}"
        mismatch = self._category_mismatch(data) if skips.counts["annotations with unknown category ids"] else ""
        if not self.images:
            raise AnnotationError(f"no usable images in {where} under {self.root}: skipped {skips.summary()}. "
                                  "The file_name entries are relative to --data-root: check it")
        if not data["annotations"]:
            raise AnnotationError(f"{where} has no annotations: nothing to train or evaluate on")
        if not self.gt_annotations:
            raise AnnotationError(f"none of the {len(data['annotations'])} annotations in {where} is usable: "
                                  f"skipped {skips.summary()}. {mismatch}".rstrip())
        require_usable(f"images in {where}", len(self.images), len(data["images"]), min_usable, skips,
                       "Check --data-root and the images.")
        require_usable(f"annotations in {where}", len(self.gt_annotations), len(data["annotations"]), min_usable,
                       skips, mismatch)

    def _category_mismatch(self, data: dict[str, Any]) -> str:
        """Which category ids the annotations use but ``categories`` does not define as classes."""
        used = Counter(a.get("category_id") for a in data["annotations"]
                       if isinstance(a, dict) and a.get("category_id") not in self.cat_to_label)
        by_id = {c["id"]: c["name"] for c in data["categories"]}
        unknown = ", ".join(f"{cat} ({n} annotations{', named ' + repr(by_id[cat]) if cat in by_id else ''})"
                            for cat, n in used.most_common(5))
        classes = ", ".join(f"{c['id']} ({c['name']!r})" for c in self.categories[:10])
        more = f" and {len(self.categories) - 10} more" if len(self.categories) > 10 else ""
        background = (f" Categories named {', '.join(BACKGROUND_NAMES)} are the implicit background, not classes."
                      if any(cat in by_id for cat in used) else "")
        return (f"The annotations use category_id {unknown}, but 'categories' defines the classes {classes}{more}."
                f"{background} Make the annotations' category_id values match the ids in 'categories'.")

    def __len__(self) -> int:
        return len(self.images)

    def coco_ground_truth(self, exclude: set[int] | frozenset[int] = frozenset()) -> dict[str, Any]:
        """The cleaned ground truth as a COCO dict (for ``pycocotools.coco.COCO``), without the images whose
        ids are in ``exclude`` (those that failed to load)."""
        return {
            "images": [{k: image[k] for k in ("id", "file_name", "height", "width")} for image in self.images
                       if image["id"] not in exclude],
            "annotations": [{k: v for k, v in ann.items() if k != "segmentation" or self.masks}
                            for ann in self.gt_annotations if ann["image_id"] not in exclude],
            "categories": self.categories,
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.images[index]
        pixels = TF.to_image(open_rgb(image["path"]))
        height, width = image["height"], image["width"]
        if tuple(pixels.shape[-2:]) != (height, width):
            raise SampleError(f"{image['path']}: decodes to {pixels.shape[-1]}x{pixels.shape[-2]}, the annotation "
                              f"says {width}x{height}")
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
