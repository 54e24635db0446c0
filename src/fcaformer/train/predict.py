"""Top-k prediction for images (files, folders, glob patterns) with any model :func:`.inference.load_any_model`
can load."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..images import expand_image_inputs
from .data import eval_transform
from .distributed import resolve_device
from .inference import load_any_model


@torch.no_grad()
def predict_images(model_source: str | os.PathLike, images: Sequence[str | os.PathLike], topk: int = 5,
                   device: str = "auto", weights: str | os.PathLike | None = None,
                   batch_size: int = 32, fast: bool = True) -> list[dict[str, Any]]:
    """Top-k labels of every image that ``images`` names (:func:`fcaformer.images.expand_image_inputs`: files,
    folders searched recursively, glob patterns), in order.

    Returns ``[{"image": path, "top": [{"index", "label", "prob"}, ...]}, ...]``; a file that cannot be read as an
    image is skipped and listed as ``{"image": path, "error": why}`` in its place. ``image`` is the path as given
    (a folder's files: the folder as given joined with the file's path in it). The inputs are checked before the
    model is loaded. ``fast``: FcaFormer models on the fused fast path (outputs equal the faithful path's within
    1e-5).

    Raises:
        FileNotFoundError / ValueError: a missing path, a folder without images, ``topk < 1``, or no readable image.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    paths = expand_image_inputs(images, recursive=True)
    loaded = load_any_model(model_source, weights, fast=fast)
    transform = eval_transform(loaded.data_config)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    results: list[dict[str, Any]] = []
    readable: list[tuple[int, torch.Tensor]] = []  # (position in results, pixels)
    for path in paths:
        try:
            with Image.open(path) as img:
                pixels = transform(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            results.append({"image": str(path), "error": f"cannot read it as an image: {error}"})
            continue
        readable.append((len(results), pixels))
        results.append({"image": str(path)})
    if not readable:
        raise ValueError(f"none of the {len(paths)} files can be read as an image (e.g. {results[0]['error']})")
    k = min(topk, len(loaded.class_names))
    for start in range(0, len(readable), batch_size):
        chunk = readable[start : start + batch_size]
        probs = model(torch.stack([pixels for _, pixels in chunk]).to(dev)).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for (position, _), vals, idxs in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            results[position]["top"] = [{"index": i, "label": loaded.class_names[i], "prob": v}
                                        for i, v in zip(idxs, vals)]
    return results
