r"""Where a run's images come from: scikit-learn's handwritten digits (the embedded default: real scans shipped in
a PyPI package, no download), ImageFolder trees (ImageNet layout), CIFAR-10/100 in torchvision's on-disk format and
packed datasets (one ``.npz`` file, see :mod:`.device_data`), each as train and validation
:class:`~fcaformer.train.data.ImageList`\ s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .config import ConfigError, DataConfig
from .data import DATA_SEED, DataError, ImageList, balanced_subset, scan_image_folder, select_classes
from .device_data import load_pack


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


def _class_display_names(root: Path, classes: list[str], names_file: str | None) -> list[str]:
    """Human names from ``root/classes.json`` (``{folder: name}``) when present, else the folder names."""
    path = root / names_file if names_file else None
    if path and path.is_file():
        mapping = json.loads(path.read_text())
        return [str(mapping.get(c, c)) for c in classes]
    return classes


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


def _decoded(images: ImageList, progress: bool = True) -> ImageList:
    """The same list with every file decoded into memory (RGB)."""
    samples = []
    for item, label in tqdm(images.samples, desc="caching images", mininterval=2, leave=False, disable=not progress):
        if isinstance(item, Image.Image):
            samples.append((item, label))
        else:
            with Image.open(item) as img:
                samples.append((img.convert("RGB"), label))
    return ImageList(samples, images.class_names, images.skipped, images.class_ids)


def load_image_lists(cfg: DataConfig, progress: bool = True) -> tuple[ImageList, ImageList]:
    """Train and validation image lists for a data config (the train subset applied).

    With ``cfg.cache`` the images are decoded once into memory and kept for later calls in this process (the
    reproduction runs several trainings on the same data)."""
    key = (cfg.dataset, cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_split, cfg.train_per_class,
           cfg.val_per_class, cfg.img_size, tuple(map(str, cfg.classes or ())))
    if cfg.cache and key in _CACHE:
        return _CACHE[key]
    train, val = _load_image_lists(cfg, progress)
    if cfg.cache:
        train, val = _decoded(train, progress), _decoded(val, progress)
        _CACHE[key] = (train, val)
    return train, val


def _load_image_lists(cfg: DataConfig, progress: bool) -> tuple[ImageList, ImageList]:
    if cfg.dataset == "digits":
        train, val = load_digits_images(max(32, cfg.img_size))
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, val = _cifar(cfg)
    elif cfg.dataset == "packed":
        train = load_pack(cfg.root, cfg.train_dir, progress)
        if cfg.val_split > 0:
            train, val = _split(train, cfg.val_split)
        else:
            val = load_pack(cfg.root, cfg.val_dir, progress)
    elif cfg.dataset == "imagefolder":
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"dataset root not found: {root} (expected an ImageFolder tree: "
                            f"{root}/{cfg.train_dir}/<class>/<images> and {root}/{cfg.val_dir}/<class>/<images>)")
        train_root = root / cfg.train_dir
        if train_root.is_dir():
            train = scan_image_folder(train_root, cfg.verify_images, progress=progress)
            val_root = root / cfg.val_dir
            if cfg.val_split > 0 or not val_root.is_dir():
                if cfg.val_split <= 0:
                    raise DataError(f"no {val_root}; pass data.val_split=0.1 (or another fraction) to split train")
                train, val = _split(train, cfg.val_split)
            else:
                val = scan_image_folder(val_root, cfg.verify_images, classes=train.class_names, progress=progress)
                val.skipped = train.skipped + val.skipped
                train.skipped = []
        else:  # a bare <root>/<class>/ tree: split it
            if cfg.val_split <= 0:
                raise DataError(f"{root} has no {cfg.train_dir}/ folder; pass data.val_split=0.1 to split {root}")
            train, val = _split(scan_image_folder(root, cfg.verify_images, progress=progress), cfg.val_split)
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
