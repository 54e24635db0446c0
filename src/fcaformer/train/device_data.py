"""Small datasets held on the training device: decoded once into a uint8 tensor, augmented there in batches.

On a GPU, a small model trained on a small dataset (Imagenette, CIFAR, the digits) spends most of each step
waiting for CPU workers to decode and augment images. This path removes the workers:

- every image is decoded once, its shorter side resized to ``store_size`` and centre-cropped square, into one
  ``(N, 3, S, S)`` uint8 tensor on the device (Imagenette's 9,469 train images at 144 px: 589 MB);
- each training batch is gathered from it and augmented on the device: random resized crop and horizontal flip
  through one affine sampling grid per image (``F.affine_grid`` + ``F.grid_sample``, bilinear), then
  brightness / contrast / saturation jitter and normalisation;
- evaluation resizes (``floor(img_size / crop_pct)``, bicubic, antialiased) and centre-crops like timm's eval
  transform.

Mixup / CutMix and label smoothing act on the batch exactly as in the worker path (timm's ``Mixup`` works on
device tensors). Randomness comes from one generator per batch seeded by (run seed, rank, epoch, batch index),
so a run resumed mid-epoch sees the augmentations of an uninterrupted one. It runs on any device, CPU included.

The random resized crop samples scale and log-aspect-ratio like torchvision's ``RandomResizedCrop`` but, instead
of retrying crops that do not fit, clamps their sides to the image (a batch needs one draw per image).
Colour jitter applies its three factors in a fixed order (torchvision shuffles the order).

Packed datasets (:func:`pack_image_folder`, ``fcaformer pack``) store both splits of an ImageFolder tree as
encoded images in one ``.npz`` file, to move a dataset in one piece (to a GPU machine with a size limit, say).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from ..files import atomic_write
from .data import DataError, ImageList, ResumableSampler, balanced_subset, sample_seed, scan_image_folder

PACK_FORMAT = "fcaformer-pack-v1"
# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------- decoding
def fit_square(img: Image.Image, size: int) -> Image.Image:
    """RGB copy of ``img`` with its shorter side resized to ``size`` (bicubic) and centre-cropped square."""
    img = img.convert("RGB")
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), Image.BICUBIC)


def _parallel_map(function: Callable, items: Sequence, desc: str, progress: bool = True) -> list:
    """``function`` over ``items`` in a thread pool (PIL decodes and resizes without holding the GIL); a progress
    bar for long lists unless ``progress`` is off."""
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, mininterval=2, leave=False,
                         disable=not progress or len(items) < 2_000))


@dataclass
class DeviceSplit:
    """One split on a device: ``images`` ``(N, 3, S, S)`` uint8 and ``labels`` ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_image_list(cls, images: ImageList, store_size: int, device: torch.device,
                        progress: bool = True) -> DeviceSplit:
        """Decode every sample of ``images`` (paths or PIL images) at ``store_size`` onto ``device``."""

        def decode(item: object) -> np.ndarray:
            if isinstance(item, Image.Image):
                return np.asarray(fit_square(item, store_size))
            try:
                with Image.open(item) as img:
                    return np.asarray(fit_square(img, store_size))
            except OSError as error:  # truncated or corrupt file that the header scan let through
                raise DataError(f"cannot read image {item}: {error}") from error

        arrays = _parallel_map(decode, [item for item, _ in images.samples], f"decoding to {store_size} px",
                               progress)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in images.samples], dtype=torch.long)
        return cls(pixels.to(device), labels.to(device))


# ------------------------------------------------------------------------------------------- augmentation
def crop_flip_grid(batch: int, out_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(B, out, out, 2)`` sampling grids of random resized crops (flipped with probability ``hflip``).

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); crop sides are clamped to the image; the crop's
    position is uniform over the positions where it fits.
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator, device=device)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: a crop of side fraction w centred at c.
    center_x = (2 * torch.rand(batch, generator=generator, device=device) - 1) * (1 - width)
    center_y = (2 * torch.rand(batch, generator=generator, device=device) - 1) * (1 - height)
    flip = torch.where(torch.rand(batch, generator=generator, device=device) < hflip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    return F.affine_grid(theta, [batch, 3, out_size, out_size], align_corners=False)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors ~ U(max(0, 1 - s), 1 + s) on ``[0, 1]`` images."""
    batch = images.shape[0]

    def factors() -> torch.Tensor:
        draw = torch.rand(batch, 1, 1, 1, generator=generator, device=images.device)
        return max(0.0, 1 - strength) + (1 + strength - max(0.0, 1 - strength)) * draw

    images = (images * factors()).clamp(0, 1)
    mean = _grayscale(images).mean((2, 3), keepdim=True)
    images = ((images - mean) * factors() + mean).clamp(0, 1)
    gray = _grayscale(images)
    return ((images - gray) * factors() + gray).clamp(0, 1)


class DeviceAugment:
    """The training transform of the device path: crop + flip, colour jitter, normalisation (see module doc)."""

    def __init__(self, img_size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: float = 0.4,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.img_size = img_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 to normalised ``(B, 3, img_size, img_size)`` float32."""
        grid = crop_flip_grid(len(images), self.img_size, self.scale, self.ratio, self.hflip, generator,
                              images.device)
        out = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        if self.color_jitter > 0:
            out = color_jitter(out, self.color_jitter, generator)
        return normalize(out, self.mean, self.std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    return (images - images.new_tensor(mean).view(1, -1, 1, 1)) / images.new_tensor(std).view(1, -1, 1, 1)


def eval_crop(images: torch.Tensor, img_size: int, crop_pct: float, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """timm's eval transform on device: resize to ``floor(img_size / crop_pct)``, centre crop, normalise."""
    out = images.float() / 255
    resize = int(math.floor(img_size / crop_pct))
    if out.shape[-1] != resize:
        out = F.interpolate(out, size=(resize, resize), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0, 1)
    top = (resize - img_size) // 2
    out = out[..., top : top + img_size, top : top + img_size]
    return normalize(out, mean, std)


# ------------------------------------------------------------------------------------------------ loaders
class DeviceTrainLoader:
    """Training batches from a :class:`DeviceSplit`, with the interface of the worker path's loader + sampler.

    Sharding, shuffling and mid-epoch starts follow :class:`~fcaformer.train.data.ResumableSampler` (full batches
    only). Batch ``b`` of epoch ``e`` is augmented under the seed ``sample_seed(seed, e, b)``.
    """

    def __init__(self, split: DeviceSplit, augment: DeviceAugment, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        self.split = split
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed + 7_777 * rank
        self.sampler = ResumableSampler(split, batch_size, rank=rank, world_size=world_size, seed=seed)
        device = split.images.device
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration covers ``epoch`` from batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.sampler.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor([index for index, _ in self.sampler], dtype=torch.long)
        order = order.view(-1, self.batch_size).to(self.split.images.device)
        for offset, indices in enumerate(order):
            batch = self.sampler.start_batch + offset
            self.generator.manual_seed(sample_seed(self.seed, self.sampler.epoch, batch))
            yield self.augment(self.split.images[indices], self.generator), self.split.labels[indices]


class DeviceEvalLoader:
    """Evaluation batches of this rank's shard (``rank::world_size``, every image once) of a split."""

    def __init__(self, split: DeviceSplit, batch_size: int, img_size: int, crop_pct: float,
                 mean: Sequence[float], std: Sequence[float], *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = torch.arange(rank, len(split), world_size, device=split.images.device)
        self.split = split
        self.batch_size = batch_size
        self.transform = lambda images: eval_crop(images, img_size, crop_pct, mean, std)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.indices.split(self.batch_size):
            yield self.transform(self.split.images[indices]), self.split.labels[indices]


# ---------------------------------------------------------------------------------------------- packing
def _encode(img: Image.Image, size: int, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    fit_square(img, size).save(buffer, image_format, quality=quality)
    return buffer.getvalue()


def pack_image_folder(root: str | os.PathLike, out: str | os.PathLike, size: int = 144, quality: int = 75,
                      image_format: str = "WEBP", splits: Sequence[str] = ("train", "val"),
                      per_class: int | None = None) -> Path:
    """Write the ``splits`` of an ImageFolder tree into one ``.npz`` file of re-encoded square images.

    Every image is resized (shorter side to ``size``, centre crop) and encoded as ``image_format`` at
    ``quality``; ``per_class`` keeps a fixed class-balanced subset of each split. Unreadable files are skipped
    with a warning. Class names come from ``root/classes.json`` when present. Returns the written path.
    """
    root = Path(root)
    arrays: dict[str, np.ndarray] = {}
    class_ids: list[str] | None = None
    counts = {}
    for split in splits:
        images = scan_image_folder(root / split, verify=True, classes=class_ids)
        class_ids = images.class_names
        if per_class:
            images = balanced_subset(images, per_class)

        def encode(path: str) -> bytes:
            with Image.open(path) as img:
                return _encode(img, size, image_format, quality)

        blobs = _parallel_map(encode, [path for path, _ in images.samples], f"packing {split}")
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([label for _, label in images.samples], dtype=np.int64)
        counts[split] = len(blobs)
    names_file = root / "classes.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    meta = {"format": PACK_FORMAT, "size": size, "image_format": image_format, "quality": quality,
            "class_ids": class_ids, "class_names": [str(names.get(c, c)) for c in class_ids], "counts": counts}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out = Path(out)
    return atomic_write(out, lambda handle: np.savez(handle, **arrays))


def read_pack_meta(path: str | os.PathLike) -> dict:
    """The metadata of a packed dataset (format, size, class names, image counts)."""
    with np.load(path, allow_pickle=False) as data:
        return _meta(data, path)


def _meta(data: np.lib.npyio.NpzFile, path: str | os.PathLike) -> dict:
    if "meta" not in data.files:
        raise DataError(f"{path} is not an fcaformer packed dataset (no metadata); make one with fcaformer pack")
    meta = json.loads(data["meta"].tobytes().decode())
    if meta.get("format") != PACK_FORMAT:
        raise DataError(f"{path}: unsupported pack format {meta.get('format')!r} (expected {PACK_FORMAT})")
    return meta


def load_pack(path: str | os.PathLike, split: str, progress: bool = True) -> ImageList:
    """One split of a packed dataset as an :class:`ImageList` of decoded in-memory RGB images."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"packed dataset not found: {path} (make one with fcaformer pack ROOT OUT.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = _meta(data, path)
            if f"{split}_bytes" not in data.files:
                raise DataError(f"{path} has no {split!r} split (it has {sorted(meta['counts'])})")
            blob, offsets, labels = data[f"{split}_bytes"], data[f"{split}_offsets"], data[f"{split}_labels"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot read packed dataset {path}: {error}") from error

    def decode(i: int) -> Image.Image:
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as img:
            return img.convert("RGB")

    images = _parallel_map(decode, range(len(labels)), f"decoding {split}", progress)
    return ImageList([(img, int(label)) for img, label in zip(images, labels)], list(meta["class_names"]),
                     class_ids=list(meta["class_ids"]))
