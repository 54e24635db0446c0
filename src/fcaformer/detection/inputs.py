"""Image files in and out, shared by detection and segmentation.

Reading: :func:`probe_image` checks a file cheaply when a dataset is scanned, :func:`open_rgb` decodes it when
a sample is loaded; both raise :class:`SampleError` naming the file. :class:`SkipUnloadable` turns such errors
into counted skips while a run goes on, and :class:`LoadFailures` names them and stops a run only when too many
samples fail. Prediction: :class:`PredictInputs` reads the images of files, folders and glob patterns
with distinct output names for inputs that share a file name (:func:`output_stems`); :func:`palette` colours
classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..files import portable_path
from ..images import expand_image_inputs

log = logging.getLogger(__name__)

# The last bytes of a complete file. A JPEG or PNG without its end marker near the end of the file was most
# likely cut short (an interrupted download or copy); only such files are decoded in full at scan time.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 64


class SampleError(ValueError):
    """One sample that cannot be used (unreadable image, bad label map); the message names the file."""


class DataCheckError(ValueError):
    """Too little usable data is left after the data checks; the message says what was dropped and why."""


def _cut_short(path: Path, image_format: str | None) -> bool:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return False
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return marker not in handle.read()


def probe_image(path: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` of an image file from its header, without decoding it.

    JPEG and PNG files whose end marker is missing are decoded in full, so a truncated file is found here
    (cheaply: complete files are not decoded) rather than hours into a run. Raises :class:`SampleError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as handle:
            size, mode = handle.size, handle.mode
            if _cut_short(path, handle.format):
                handle.load()
    except FileNotFoundError:
        raise SampleError(f"{path}: file not found") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for bad files
        raise SampleError(f"{path}: {error}") from error
    return size, mode


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file as RGB; :class:`SampleError` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except FileNotFoundError:
        raise SampleError(f"{path}: file not found") from None
    except Exception as error:  # e.g. "image file is truncated" from a file damaged after the scan
        raise SampleError(f"{path}: {error}") from error


# ------------------------------------------------------------------------------------- skipping at load time
@dataclass
class Loaded:
    """What :class:`SkipUnloadable` returns for one index: the sample (``None`` when dropped) and the errors
    of the samples that failed on the way."""

    index: int
    sample: Any
    errors: list[str] = field(default_factory=list)


@dataclass
class LoadedBatch:
    """A collated batch (``None`` when every sample of it was dropped) and the load errors behind it."""

    data: Any
    errors: list[str]
    dropped: list[int]


class SkipUnloadable(Dataset):
    """Loads ``dataset[i]``, turning a :class:`SampleError` into a skip instead of ending the run.

    With ``substitute`` (training) the next sample that loads takes the failed one's place, so batches stay
    full; without it (evaluation) the sample is dropped. The errors travel with the result, so that they reach
    the main process from data-loader workers too (see :class:`SkippingCollate`).
    """

    def __init__(self, dataset: Any, substitute: bool) -> None:
        self.dataset = dataset
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.dataset)

    max_tries = 16
    """Samples tried for one index before giving up on it (the run's :class:`LoadFailures` decides to stop)."""

    def __getitem__(self, index: int) -> Loaded:
        errors: list[str] = []
        # Errors are returned, never raised: a data-loader worker would wrap them in a multi-line traceback.
        for offset in range(min(len(self.dataset), self.max_tries if self.substitute else 1)):
            current = (index + offset) % len(self.dataset)
            try:
                return Loaded(current, self.dataset[current], errors)
            except SampleError as error:
                errors.append(str(error))
        return Loaded(index, None, errors)


class SkippingCollate:
    """Collates :class:`Loaded` items into a :class:`LoadedBatch` with ``collate_fn`` (default: torch's)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list[Loaded]) -> LoadedBatch:
        samples = [item.sample for item in items if item.sample is not None]
        return LoadedBatch(data=self.collate_fn(samples) if samples else None,
                           errors=[error for item in items for error in item.errors],
                           dropped=[item.index for item in items if item.sample is None])


class LoadFailures:
    """The samples that failed to load during a run: each is logged once, and the run stops (with
    :class:`DataCheckError`) once fewer than ``min_usable`` of the ``total`` samples listed in the dataset are
    usable (``scan_skipped`` of them were already dropped when the dataset was scanned)."""

    def __init__(self, total: int, min_usable: float, logger: logging.Logger = log, scan_skipped: int = 0) -> None:
        self.total = total
        self.min_usable = min_usable
        self.logger = logger
        self.scan_skipped = scan_skipped
        self.messages: list[str] = []

    def record(self, errors: Sequence[str]) -> None:
        new = [error for error in dict.fromkeys(errors) if error not in self.messages]
        for error in new:
            self.messages.append(error)
            self.logger.warning("skipping a sample that cannot be loaded: %s", error)
        usable = self.total - self.scan_skipped - len(self.messages)
        if new and usable < self.min_usable * self.total:
            scanned = f"{self.scan_skipped} skipped when the data was scanned, " if self.scan_skipped else ""
            raise DataCheckError(
                f"only {usable} of {self.total} samples are usable ({scanned}{len(self.messages)} failed to load, "
                f"e.g. {self.messages[0]}); fix or remove these files, or lower --min-usable (now {self.min_usable})")


def loss_skipping(loss_fn: Callable[[Any, Any], dict[str, torch.Tensor]],
                  failures: LoadFailures) -> Callable[[Any, LoadedBatch], dict[str, torch.Tensor]]:
    """``loss_fn`` for batches of :class:`SkippingCollate`: records their load errors, then computes the loss."""
    def loss(model: Any, batch: LoadedBatch) -> dict[str, torch.Tensor]:
        failures.record(batch.errors)
        if batch.data is None:
            raise DataCheckError(f"no sample of a training batch can be loaded (e.g. {batch.errors[0]}); fix or "
                                 "remove these files")
        return loss_fn(model, batch.data)

    return loss


# ------------------------------------------------------------------------------------------------- predict
def output_stems(paths: Sequence[Path], suffixes: Sequence[str] = (".png",)) -> list[str]:
    """Distinct output names (without suffix, ``/`` for sub-folders) for ``paths``.

    The file stem when every output (stem + each of ``suffixes``) is distinct; otherwise the path relative to
    the inputs' common folder (``a/x``, ``b/x``), and an ``_<n>`` counter for what still collides (``x.jpg``
    next to ``x.png``).
    """
    def distinct(stems: list[str]) -> bool:
        names = [stem + suffix for stem in stems for suffix in suffixes]
        return len(set(names)) == len(names)

    stems = [p.stem for p in paths]
    if distinct(stems):
        return stems
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    stems = [p.relative_to(root).with_suffix("").as_posix() for p in resolved]
    taken: set[str] = set()
    for i, stem in enumerate(stems):
        candidate, n = stem, 1
        while {candidate + s for s in suffixes} & taken:
            n += 1
            candidate = f"{stem}_{n}"
        stems[i] = candidate
        taken.update(candidate + s for s in suffixes)
    return stems


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image as a float ``(3, H, W)`` tensor in [0, 1]; :class:`SampleError` naming the file otherwise."""
    return TF.to_dtype(TF.to_image(open_rgb(path)), torch.float32, scale=True).as_subclass(torch.Tensor)


@dataclass
class PredictInput:
    """One image to predict: its path, the output name to write it under (no suffix) and its pixels."""

    path: Path
    stem: str
    image: torch.Tensor


class PredictInputs:
    """The images of ``predict``'s inputs (files, folders and glob patterns, see
    :func:`fcaformer.images.expand_image_inputs`), with distinct output
    names (see :func:`output_stems`; ``suffixes`` are those of the files written for each input).

    Iterating reads them one by one; an image that cannot be read is logged, recorded in ``failed`` (input and
    error) and skipped, so one bad file does not stop a folder's prediction. If none can be read, iteration
    ends with ``ValueError``.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike], suffixes: Sequence[str] = (".png",),
                 logger: logging.Logger = log, show_progress: bool = True) -> None:
        self.paths = expand_image_inputs(inputs)
        self.stems = output_stems(self.paths, suffixes)
        self.logger = logger
        self.show_progress = show_progress
        self.failed: list[dict[str, str]] = []
        if self.stems != [p.stem for p in self.paths]:
            logger.warning("some inputs share a file name; their outputs are named after their paths relative to "
                           "the inputs' common folder, e.g. %s -> %s (predictions.json lists every pair)",
                           self.paths[-1], self.stems[-1])

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[PredictInput]:
        for path, stem in tqdm(list(zip(self.paths, self.stems)), desc="predict", disable=not self.show_progress,
                               dynamic_ncols=True):
            try:
                image = read_image(path)
            except SampleError as error:
                self.logger.warning("skipping an image that cannot be read: %s", error)
                self.failed.append({"image": portable_path(str(path)), "error": str(error)})
                continue
            yield PredictInput(path, stem, image)
        if self.failed and len(self.failed) == len(self.paths):
            raise ValueError(f"none of the {len(self.paths)} images can be read (e.g. {self.failed[0]['error']})")


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), ``(num_classes, 3)`` uint8; distinct for up to 256."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours
