"""Image lists, transforms and resumable loaders (the sources that fill the lists: :mod:`.datasets`).

Transforms are timm's (``create_transform``). Every training sample is augmented under its own seed, a function
of (run seed, epoch, index), so a run resumed mid-epoch sees exactly the augmentations of an uninterrupted one,
whatever the number of loader workers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from ..images import is_image_name
from .config import TrainConfig
from .state import seed_everything

DATA_SEED = 0  # fixes subsets and splits independently of the run seed, so every run sees the same data


class DataError(ValueError):
    """A dataset that cannot be used (missing folder, no readable image, ...)."""


@dataclass
class ImageList:
    """Samples (a path or an in-memory PIL image, and a label) plus class names and skipped files."""

    samples: list[tuple[Any, int]]
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    class_ids: list[str] | None = None  # folder names (e.g. ImageNet synsets) when they differ from the names

    def __len__(self) -> int:
        return len(self.samples)


class ImageDataset(Dataset):
    """Images from an :class:`ImageList` through a transform.

    Indices may be ``(index, seed)`` pairs (from :class:`ResumableSampler`): the transform then runs under
    ``seed``, which makes augmentation a pure function of the pair.
    """

    def __init__(self, images: ImageList, transform: Callable | None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.images.samples]

    def _open(self, index: int) -> tuple[Image.Image, int]:
        item, label = self.images.samples[index]
        if isinstance(item, Image.Image):
            return item, label
        with Image.open(item) as img:
            return img.convert("RGB"), label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_everything(seed)
        try:
            img, label = self._open(index)
        except (OSError, UnidentifiedImageError) as error:  # the scan missed it (e.g. truncated data)
            raise DataError(f"cannot read image {self.images.samples[index][0]}: {error}") from error
        return (self.transform(img) if self.transform else img), label


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-sample augmentation seed: distinct for every (run seed, epoch, index)."""
    return (seed * 1_000_003 + epoch * 7_919 + 1) * 2_147_483_647 + index * 104_729 & (2**62 - 1)


class ResumableSampler(Sampler):
    """torch's ``DistributedSampler`` (shuffle and shard per epoch) that can start mid-epoch and yields
    ``(index, seed)`` pairs for per-sample seeded augmentation.

    Every rank gets the same number of samples (the ``n mod world_size`` left over are left out of that epoch,
    never repeated). ``drop_last``: only full batches (else the last batch of an epoch may be smaller)."""

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                        drop_last=True)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration covers ``epoch``, skipping its first ``start_batch`` batches (already trained on)."""
        self.epoch, self.start_batch = epoch, start_batch
        self.inner.set_epoch(epoch)

    def batches_per_epoch(self) -> int:
        return (len(self.inner) // self.batch_size if self.drop_last
                else math.ceil(len(self.inner) / self.batch_size))

    def _samples(self) -> int:
        return min(len(self.inner), self.batches_per_epoch() * self.batch_size)

    def __len__(self) -> int:
        return max(0, self._samples() - self.start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)[self.start_batch * self.batch_size : self._samples()]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def batch_indices(self, batch: int) -> list[int]:
        """The dataset indices of batch ``batch`` of the current epoch on this rank (for the sample log)."""
        return list(self.inner)[batch * self.batch_size : min((batch + 1) * self.batch_size, self._samples())]


class SeededSamples(Dataset):
    """Any dataset indexed by :class:`ResumableSampler`'s ``(index, seed)`` pairs: each sample is loaded under its
    seed (Python, NumPy and torch), so random augmentation is a pure function of the pair, whichever loader worker
    runs it and whether the run was resumed."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_everything(seed)
        return self.dataset[index]


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for bad files
        return False


def scan_image_folder(root: str | Path, verify: bool = True, classes: Sequence[str] | None = None,
                      progress: bool = True) -> ImageList:
    """``root/<class>/<image>`` to an :class:`ImageList`; unreadable or non-image files are skipped with a
    warning naming each one. Raises :class:`DataError` when nothing readable is left. ``progress``: a bar over the
    classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {root}/<class>/<images>)")
    classes = list(classes) if classes else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<images>)")
    samples, skipped = [], []
    for label, name in enumerate(tqdm(classes, desc=f"scanning {root}", mininterval=2, leave=False,
                                      disable=not progress)):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder {folder} is missing (the train split has class {name!r})")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if not is_image_name(path) or (verify and not _is_readable(path)):
                warnings.warn(f"skipping unreadable or non-image file: {path}", stacklevel=2)
                skipped.append(str(path))
                continue
            samples.append((str(path), label))
    if not samples:
        raise DataError(f"no readable image in {root} ({len(skipped)} files skipped); "
                        "check the path and the file formats")
    return ImageList(samples, classes, skipped)


def balanced_subset(images: ImageList, per_class: int) -> ImageList:
    """At most ``per_class`` samples of each class, chosen with a fixed seed."""
    rng = np.random.default_rng(DATA_SEED)
    order = rng.permutation(len(images.samples))
    counts: dict[int, int] = {}
    keep = []
    for i in order:
        label = images.samples[i][1]
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return ImageList([images.samples[i] for i in sorted(keep)], images.class_names, images.skipped,
                     images.class_ids)


def select_classes(images: ImageList, classes: Sequence[str | int]) -> ImageList:
    """Only the samples of ``classes`` (folder names, e.g. ImageNet synsets, or display names), relabelled
    ``0 .. len(classes) - 1`` in the given order.

    Raises:
        DataError: a class that the dataset does not have (the message lists the ones it has).
    """
    ids = images.class_ids or images.class_names
    order = []
    for wanted in map(str, classes):
        if wanted in ids:
            order.append(ids.index(wanted))
        elif wanted in images.class_names:
            order.append(images.class_names.index(wanted))
        else:
            raise DataError(f"data.classes: the dataset has no class {wanted!r}; it has {ids}")
    relabel = {old: new for new, old in enumerate(order)}
    samples = [(item, relabel[label]) for item, label in images.samples if label in relabel]
    return ImageList(samples, [images.class_names[i] for i in order], images.skipped,
                     [images.class_ids[i] for i in order] if images.class_ids else None)


# ------------------------------------------------------------------------------------------------ transforms
def build_transforms(config: TrainConfig) -> tuple[Callable, Callable]:
    """timm train and eval transforms for a config."""
    d, a = config.data, config.aug
    train = create_transform(
        d.img_size, is_training=True, scale=tuple(a.scale), hflip=a.hflip, color_jitter=a.color_jitter,
        auto_augment=a.auto_augment, interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std),
        re_prob=a.re_prob,
    )
    return train, build_eval_transform(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std)


def build_eval_transform(img_size: int | tuple[int, int], crop_pct: float, interpolation: str, mean: Sequence[float],
                         std: Sequence[float], crop_mode: str = "center") -> Callable:
    """timm's eval transform: resize the shorter side to ``floor(img_size / crop_pct)`` and centre crop
    (``crop_mode="center"``), or resize both sides to it (``"squash"``: with ``crop_pct=1`` a plain warp to
    ``img_size`` x ``img_size``, as the release evaluates from 384 px on); then normalise."""
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, crop_mode=crop_mode,
                            interpolation=interpolation, mean=tuple(mean), std=tuple(std))


def eval_transform(data_config: Mapping[str, Any]) -> Callable:
    """:func:`build_eval_transform` of a data config (``img_size``, ``crop_pct``, ``interpolation``, ``mean``,
    ``std``, optional ``crop_mode``), as checkpoints record it."""
    d = data_config
    return build_eval_transform(d["img_size"], d["crop_pct"], d["interpolation"], d["mean"], d["std"],
                                d.get("crop_mode", "center"))


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Sequential loader over this rank's shard (``rank::world_size``, no padding, so metrics are exact)."""
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)


def train_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, workers: int) -> DataLoader:
    """Training loader driven by a :class:`ResumableSampler` (full batches only)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
