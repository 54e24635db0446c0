"""Image files as users name them: files, folders and glob patterns, expanded once and checked before any model is
loaded. Knows nothing about models."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File suffixes taken as images when a folder is searched (case-insensitive)."""


def is_image_name(path: Path) -> bool:
    """Whether ``path`` has an image suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def expand_image_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """The image files that ``inputs`` name, in order, each once.

    - a file is taken as it is, whatever its suffix (reading it is the test of whether it is an image: callers skip
      and name the ones that are not);
    - a folder stands for its image files (by suffix, sorted; with ``recursive`` also those in sub-folders, e.g.
      the class folders of an ImageFolder split);
    - a pattern with ``*``, ``?`` or ``[...]`` that names no existing path is expanded like the shell does (sorted),
      and each match taken as above.

    Paths keep the form they were given in (relative stays relative), so that what is recorded is what the user
    typed.

    Raises:
        FileNotFoundError: a path that does not exist, or a pattern that matches nothing.
        ValueError: a folder without images, or no input at all.
    """
    paths: list[Path] = []
    for item in map(os.fspath, inputs):
        candidates = [item]
        if not os.path.exists(item) and glob.has_magic(item):
            candidates = sorted(glob.glob(item, recursive=True))
            if not candidates:
                raise FileNotFoundError(f"no file matches {item!r}")
        for candidate in map(Path, candidates):
            if candidate.is_dir():
                found = candidate.rglob("*") if recursive else candidate.iterdir()
                images = sorted(p for p in found if p.is_file() and is_image_name(p))
                if not images:
                    where = ", sub-folders included" if recursive else ""
                    raise ValueError(f"folder {candidate} has no images ({', '.join(IMAGE_SUFFIXES)} files{where})")
                paths.extend(images)
            elif candidate.exists():
                paths.append(candidate)
            else:
                raise FileNotFoundError(f"image not found: {candidate}")
    if not paths:
        raise ValueError("no images given")
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique
