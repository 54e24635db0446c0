"""ADE20K-format semantic segmentation data: an image folder and a folder of PNG label maps with equal stems."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from tqdm import tqdm

from ..detection.data import SkipCounter, require_usable
from ..detection.inputs import SampleError, open_rgb, probe_image
from ..images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
LABEL_MODES = ("P", "L", "I", "I;16", "1")
"""PIL modes of single-channel label maps (class indices; palette PNGs give their indices, not colours)."""

__all__ = ["IGNORE_INDEX", "IMAGE_SUFFIXES", "LABEL_MODES", "SegmentationFolder", "normalize", "read_label_map"]


def _wrong_mode(path: str | os.PathLike, mode: str) -> str:
    return (f"label map {path} has mode {mode}; expected a single-channel (L or palette) PNG of class indices, "
            "not a colour image")


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """A PNG label map as ``(H, W)`` int64 class indices (palette PNGs give their indices, not colours).

    Raises :class:`~fcaformer.detection.inputs.SampleError` naming the file when it cannot be decoded or is not
    a single-channel image.
    """
    try:
        with Image.open(path) as handle:
            if handle.mode not in LABEL_MODES:
                raise SampleError(_wrong_mode(path, handle.mode))
            return np.asarray(handle, dtype=np.int64)
    except SampleError:
        raise
    except Exception as error:  # truncated or corrupt PNG: PIL raises several types
        raise SampleError(f"label map {path}: {error}") from error


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of float ``(..., 3, H, W)`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=image.device).view(3, 1, 1)
    return (image - mean) / std


class SegmentationFolder(Dataset):
    """Pairs ``img_dir/<stem>.<jpg|png>`` with ``ann_dir/<stem>.png`` (ADE20K / VOC layout).

    Pairs that cannot be used are skipped, logged, named and counted in ``self.skipped`` (and every case in
    ``self.skip_details``) when the folders are scanned: images without a label map, unreadable or truncated
    images or label maps (header and end marker are checked), label maps that are not single-channel (e.g.
    colour visualisations) and label maps whose size differs from their image. Fewer than ``min_usable`` of
    the images left raises :class:`~fcaformer.detection.inputs.DataCheckError` saying why. A pair that fails
    when it is read (a file damaged beyond its header, label values outside ``[0, num_classes)`` other than
    255) raises :class:`~fcaformer.detection.inputs.SampleError` (a ``ValueError``) naming the file; training
    and evaluation skip it.

    Args:
        img_dir, ann_dir: the two folders.
        num_classes: classes after ``reduce_zero_label``.
        reduce_zero_label: ADE20K convention: label 0 ("other") becomes 255 (ignored), the rest shift down by 1.
        train: random scaling (``scale_range``), random ``crop_size`` crops (padded with ignore) and flips;
            otherwise whole images.
        base_size: train images are first resized so that the shorter side is ``base_size`` (0: keep).
        scale_range: ``(low, high)`` random scale factor on top of ``base_size`` (multi-scale training);
            ``None`` for a fixed scale.
        crop_size: train crop ``(H, W)``.
        min_usable: smallest usable fraction of the images (0: only require one pair).
        progress: show a progress bar while the folders are checked.
    """

    def __init__(
        self,
        img_dir: str | os.PathLike,
        ann_dir: str | os.PathLike,
        num_classes: int,
        *,
        reduce_zero_label: bool = False,
        train: bool = False,
        base_size: int = 512,
        scale_range: tuple[float, float] | None = (0.5, 2.0),
        crop_size: Sequence[int] = (512, 512),
        min_usable: float = 0.5,
        progress: bool = False,
    ) -> None:
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        for label, folder in (("image", self.img_dir), ("label", self.ann_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{label} folder not found: {folder}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.train = train
        self.base_size = base_size
        self.scale_range = scale_range
        self.crop_size = tuple(crop_size)
        skips = SkipCounter(log)
        self.samples: list[tuple[Path, Path]] = []
        images = sorted(p for p in self.img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for image_path in tqdm(images, desc="checking images", disable=not progress, dynamic_ncols=True):
            label_path = self.ann_dir / f"{image_path.stem}.png"
            if not label_path.exists():
                skips.add("images without a label map", f"{image_path} (no {label_path})")
                continue
            try:
                (image_size, _), (label_size, label_mode) = probe_image(image_path), probe_image(label_path)
            except SampleError as error:
                skips.add("unreadable images or label maps", str(error))
                continue
            if label_mode not in LABEL_MODES:
                skips.add("label maps that are not single-channel class indices", _wrong_mode(label_path,
                                                                                              label_mode))
                continue
            sizes = image_size, label_size
            if sizes[0] != sizes[1]:
                skips.add("label maps whose size differs from the image",
                          f"{label_path} is {sizes[1][0]}x{sizes[1][1]}, image {sizes[0][0]}x{sizes[0][1]}")
                continue
            self.samples.append((image_path, label_path))
        self.listed = len(images)  # before the checks
        self.skipped = skips.counts
        self.skip_details = skips.details
        skips.report(str(self.img_dir))
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.img_dir}")
        if not self.samples:
            raise ValueError(f"no usable image / label pairs in {self.img_dir} and {self.ann_dir}: skipped "
                             f"{skips.summary()}")
        require_usable(f"images in {self.img_dir}", len(self.samples), len(images), min_usable, skips,
                       f"Label maps are read from {self.ann_dir} as <image stem>.png: check --ann-dir.")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image float ``(3, H, W)`` in [0, 1] and label ``(H, W)`` int64 (255 = ignore), untransformed."""
        image_path, label_path = self.samples[index]
        image = torch.from_numpy(np.asarray(open_rgb(image_path)).copy()).permute(2, 0, 1).float() / 255
        label = read_label_map(label_path)
        if label.shape != image.shape[1:]:
            raise SampleError(f"label map {label_path} decodes to {label.shape[1]}x{label.shape[0]}, its image "
                              f"{image_path} to {image.shape[2]}x{image.shape[1]}")
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        invalid = (label >= self.num_classes) & (label != IGNORE_INDEX) | (label < 0)
        if invalid.any():
            values = sorted(set(np.unique(label[invalid]).tolist()))[:10]
            raise SampleError(f"label map {label_path} has values {values} outside [0, {self.num_classes}) and not "
                             f"{IGNORE_INDEX}; set num_classes / --num-classes (or --reduce-zero-label for ADE20K)")
        return image, torch.from_numpy(label)

    def _train_transform(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        scale = self.base_size / min(height, width) if self.base_size else 1.0
        if self.scale_range:
            scale *= random.uniform(*self.scale_range)
        size = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(0, crop_h - size[0]), max(0, crop_w - size[1])
        if pad_h or pad_w:  # pad with zeros (image) and ignore (label)
            image = F.pad(image, (0, pad_w, 0, pad_h))
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = random.randint(0, image.shape[1] - crop_h)
        left = random.randint(0, image.shape[2] - crop_w)
        image = image[:, top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        if random.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.train:
            image, label = self._train_transform(image, label)
        return normalize(image), label
