"""Datasets, transforms and resumable loaders.

Sources: scikit-learn's handwritten digits (the embedded default: real scans shipped in a PyPI package, no
download), ImageFolder trees (ImageNet layout), CIFAR-10/100 in torchvision's on-disk format and packed datasets
(one ``.npz`` file, see :mod:`.device_data`).
Transforms are timm's (``create_transform``). Every training sample is augmented under its own seed, a function
of (run seed, epoch, index), so a run resumed mid-epoch sees exactly the augmentations of an uninterrupted one,
whatever the number of loader workers.
"""

from __future__ import annotations

import json
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

from .config import ConfigError, DataConfig, TrainConfig
from .state import seed_everything

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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


# ------------------------------------------------------------------------------------------------ sources
def load_digits_images(img_size: int = 32) -> tuple[ImageList, ImageList]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled bicubically to ``img_size`` and
    split 80/20 stratified (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = [
        Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8), mode="L")
        .resize((img_size, img_size), Image.BICUBIC)
        .convert("RGB")
        for img in digits.images
    ]
    labels = [int(t) for t in digits.target]
    idx_train, idx_val = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=DATA_SEED
    )
    names = [str(i) for i in range(10)]
    pick = lambda idx: ImageList([(images[i], labels[i]) for i in idx], names)
    return pick(idx_train), pick(idx_val)


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for bad files
        return False


def scan_image_folder(root: str | Path, verify: bool = True, classes: Sequence[str] | None = None) -> ImageList:
    """``root/<class>/<image>`` to an :class:`ImageList`; unreadable or non-image files are skipped with a
    warning naming each one. Raises :class:`DataError` when nothing readable is left."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {root}/<class>/<images>)")
    classes = list(classes) if classes else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<images>)")
    samples, skipped = [], []
    for label, name in enumerate(tqdm(classes, desc=f"scanning {root}", mininterval=2, leave=False)):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder {folder} is missing (the train split has class {name!r})")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMG_EXTENSIONS or (verify and not _is_readable(path)):
                warnings.warn(f"skipping unreadable or non-image file: {path}", stacklevel=2)
                skipped.append(str(path))
                continue
            samples.append((str(path), label))
    if not samples:
        raise DataError(f"no readable image in {root} ({len(skipped)} files skipped); "
                        "check the path and the file formats")
    return ImageList(samples, classes, skipped)


def _class_display_names(root: Path, classes: list[str], names_file: str | None) -> list[str]:
    """Human names from ``root/classes.json`` (``{folder: name}``) when present, else the folder names."""
    path = root / names_file if names_file else None
    if path and path.is_file():
        mapping = json.loads(path.read_text())
        return [str(mapping.get(c, c)) for c in classes]
    return classes


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


def _split(images: ImageList, fraction: float) -> tuple[ImageList, ImageList]:
    from sklearn.model_selection import train_test_split

    labels = [label for _, label in images.samples]
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels,
                                          random_state=DATA_SEED)
    pick = lambda idx: ImageList([images.samples[i] for i in idx], images.class_names, images.skipped,
                                 images.class_ids)
    return pick(idx_train), pick(idx_val)


def _cifar(cfg: DataConfig) -> tuple[ImageList, ImageList]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.dataset == "cifar10" else CIFAR100
    try:
        sets = [cls(cfg.root, train=train, download=False) for train in (True, False)]
    except RuntimeError as error:
        raise DataError(f"{cfg.dataset} not found under {cfg.root} (torchvision's on-disk format, e.g. "
                        f"{cfg.root}/cifar-10-batches-py); this tool never downloads: {error}") from error
    lists = [ImageList([(Image.fromarray(img), int(t)) for img, t in zip(s.data, s.targets)], list(s.classes))
             for s in sets]
    return lists[0], lists[1]


_CACHE: dict[tuple, tuple[ImageList, ImageList]] = {}


def _decoded(images: ImageList) -> ImageList:
    """The same list with every file decoded into memory (RGB)."""
    samples = []
    for item, label in tqdm(images.samples, desc="caching images", mininterval=2, leave=False):
        if isinstance(item, Image.Image):
            samples.append((item, label))
        else:
            with Image.open(item) as img:
                samples.append((img.convert("RGB"), label))
    return ImageList(samples, images.class_names, images.skipped, images.class_ids)


def load_image_lists(cfg: DataConfig) -> tuple[ImageList, ImageList]:
    """Train and validation image lists for a data config (the train subset applied).

    With ``cfg.cache`` the images are decoded once into memory and kept for later calls in this process (the
    reproduction runs several trainings on the same data)."""
    key = (cfg.dataset, cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_split, cfg.train_per_class,
           cfg.val_per_class, cfg.img_size, tuple(map(str, cfg.classes or ())))
    if cfg.cache and key in _CACHE:
        return _CACHE[key]
    train, val = _load_image_lists(cfg)
    if cfg.cache:
        train, val = _decoded(train), _decoded(val)
        _CACHE[key] = (train, val)
    return train, val


def _load_image_lists(cfg: DataConfig) -> tuple[ImageList, ImageList]:
    if cfg.dataset == "digits":
        train, val = load_digits_images(max(32, cfg.img_size))
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, val = _cifar(cfg)
    elif cfg.dataset == "packed":
        from .device_data import load_pack

        train = load_pack(cfg.root, cfg.train_dir)
        if cfg.val_split > 0:
            train, val = _split(train, cfg.val_split)
        else:
            val = load_pack(cfg.root, cfg.val_dir)
    elif cfg.dataset == "imagefolder":
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"dataset root not found: {root} (expected an ImageFolder tree: "
                            f"{root}/{cfg.train_dir}/<class>/<images> and {root}/{cfg.val_dir}/<class>/<images>)")
        train_root = root / cfg.train_dir
        if train_root.is_dir():
            train = scan_image_folder(train_root, cfg.verify_images)
            val_root = root / cfg.val_dir
            if cfg.val_split > 0 or not val_root.is_dir():
                if cfg.val_split <= 0:
                    raise DataError(f"no {val_root}; pass data.val_split=0.1 (or another fraction) to split train")
                train, val = _split(train, cfg.val_split)
            else:
                val = scan_image_folder(val_root, cfg.verify_images, classes=train.class_names)
                val.skipped = train.skipped + val.skipped
                train.skipped = []
        else:  # a bare <root>/<class>/ tree: split it
            if cfg.val_split <= 0:
                raise DataError(f"{root} has no {cfg.train_dir}/ folder; pass data.val_split=0.1 to split {root}")
            train, val = _split(scan_image_folder(root, cfg.verify_images), cfg.val_split)
        names = _class_display_names(root, train.class_names, cfg.class_names_file)
        train.class_ids = val.class_ids = list(train.class_names)
        train.class_names = val.class_names = names
    else:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}")
    if cfg.classes:
        train, val = select_classes(train, cfg.classes), select_classes(val, cfg.classes)
    if cfg.train_per_class:
        train = balanced_subset(train, cfg.train_per_class)
    if cfg.val_per_class:
        val = balanced_subset(val, cfg.val_per_class)
    return train, val


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
