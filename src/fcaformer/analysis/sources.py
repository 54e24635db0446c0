"""What to analyse: a model (any weights :func:`fcaformer.weights.read_weights` reads, or an FcaFormer name) and a set
of images."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms import functional as TF

from ..files import path_label, relative_path
from ..images import IMAGE_SUFFIXES
from ..weights import read_weights


@dataclass
class LoadedModel:
    """A model in eval mode and what is known about it."""

    model: nn.Module
    source: str
    kind: str  # "project", "release" or "timm"
    img_size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    class_names: list[str] | None = None
    trained: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "class": type(self.model).__name__,
            "img_size": list(self.img_size),
            "trained_weights": self.trained,
            **self.details,
        }


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def native_img_size(model: nn.Module) -> tuple[int, int]:
    """The training resolution a model was built for (224 when it does not say)."""
    if hasattr(model, "img_size"):
        return _pair(model.img_size)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return _pair(patch_embed.img_size)
    return (224, 224)


ANALYSIS_KINDS = {"project checkpoint": "project", "training state": "project", "timm hub folder": "project",
                  "release checkpoint": "release", "release dense backbone": "release", "timm model": "timm"}
"""How analysis reports name the kind of weights (:attr:`fcaformer.weights.WeightsRecord.kind`)."""


def load_analysis_model(source: str | os.PathLike, **overrides: Any) -> LoadedModel:
    """Load what to analyse, in eval mode.

    Args:
        source: anything :func:`fcaformer.weights.read_weights` reads that names its network: a project checkpoint,
            a release checkpoint, a training state, a timm hub folder, or a registered FcaFormer name (``fcaformer_l1``:
            random weights).
        overrides: constructor arguments, e.g. ``window_size=(14, 7)`` for windowed attention.

    Raises:
        FileNotFoundError / ValueError / CheckpointError: naming what was given and what is accepted.
    """
    record = read_weights(source)
    fcaformer_names = timm.list_models("fcaformer*")
    if record.kind == "timm model" and record.model_name not in fcaformer_names:
        raise ValueError(f"{record.label!r} is neither an existing checkpoint file nor an FcaFormer model name; "
                         f"model names: {fcaformer_names}")
    model = record.build(**overrides)
    kind = ANALYSIS_KINDS.get(record.kind, record.kind)
    if record.kind == "timm model":
        return LoadedModel(model, record.label, kind, native_img_size(model), trained=False,
                           details={"note": "randomly initialised (no pretrained weights are downloaded)"})
    if kind == "release":
        return LoadedModel(model, record.label, kind, native_img_size(model))
    kwargs = record.model_kwargs
    data = record.data_config or {}  # written by the trainer: size and normalisation
    size = kwargs.get("img_size", data.get("img_size"))
    details = {"model": record.architecture, "model_name": record.model_name, "model_kwargs": _jsonable(kwargs)}
    if record.info.get("metrics"):
        details["checkpoint_metrics"] = _jsonable(record.info["metrics"])
    return LoadedModel(
        model,
        record.label,
        kind,
        _pair(size) if size is not None else native_img_size(model),
        mean=tuple(data.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(data.get("std", IMAGENET_DEFAULT_STD)),
        class_names=record.class_names,
        details=details,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


@dataclass
class ImageSet:
    """Image files, with labels (class-folder names) when they come from a class-per-folder dataset.

    ``names`` and ``root`` are what reports record: each image relative to the folder it was found in (a file
    given directly: its name), and the inputs by :func:`~fcaformer.files.path_label`; never absolute paths.
    """

    paths: list[Path]
    labels: list[str | None]
    root: str
    classes: list[str] | None = None  # sorted class folders of a class-per-folder dataset (ImageFolder order)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def collect_images(inputs: Sequence[str | os.PathLike], num_images: int | None = None) -> ImageSet:
    """Image files from files and folders, deterministically.

    A folder with class sub-folders (``val/<class>/*.jpg``) is sampled round-robin over its classes (sorted),
    so ``num_images`` covers every class evenly; its images are labelled with the class-folder name. A folder
    of images is taken in sorted order. Files are read in place.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no images found.
    """
    paths: list[Path] = []
    labels: list[str | None] = []
    names: list[str] = []
    all_classes: list[str] | None = None
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"image or folder not found: {path}")
        if path.is_file():
            if not _is_image(path):
                raise ValueError(f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            paths.append(path)
            labels.append(None)
            names.append(path.name)
            continue
        start = len(paths)
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        per_class = [sorted(p for p in c.iterdir() if _is_image(p)) for c in classes]
        if any(per_class):
            all_classes = [c.name for c in classes] if all_classes is None else all_classes
            for rank in range(max(len(files) for files in per_class)):
                for folder, files in zip(classes, per_class, strict=False):
                    if rank < len(files):
                        paths.append(files[rank])
                        labels.append(folder.name)
        else:
            files = sorted(p for p in path.iterdir() if _is_image(p))
            paths += files
            labels += [None] * len(files)
        names += [relative_path(p, path) for p in paths[start:]]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {[str(i) for i in inputs]}")
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        paths, labels, names = paths[:num_images], labels[:num_images], names[:num_images]
    return ImageSet(paths, labels, ", ".join(path_label(i) for i in inputs), all_classes, names)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image resized (bicubic, whole, no crop) to ``size``: ``(3, H, W)`` floats in ``[0, 1]``."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        return TF.to_tensor(image)


def iter_batches(
    images: ImageSet, size: tuple[int, int], batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(normalised batch, raw batch in [0, 1])`` pairs over ``images``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        raw = torch.stack([load_image(p, size) for p in images.paths[start : start + batch_size]])
        yield TF.normalize(raw, list(mean), list(std)), raw
