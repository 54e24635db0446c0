"""Top-k prediction for image files with any model :func:`.inference.load_any_model` can load."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .data import eval_transform
from .distributed import resolve_device
from .inference import load_any_model


@torch.no_grad()
def predict_images(model_source: str | os.PathLike, images: Sequence[str | os.PathLike], topk: int = 5,
                   device: str = "auto", weights: str | os.PathLike | None = None,
                   batch_size: int = 32, fast: bool = True) -> list[dict[str, Any]]:
    """``[{"image": path, "top": [{"index", "label", "prob"}, ...]}, ...]`` in input order.

    ``fast``: run FcaFormer models on the fused fast path (outputs equal the faithful path's within 1e-5).

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable image, named.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    loaded = load_any_model(model_source, weights, fast=fast)
    transform = eval_transform(loaded.data_config)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    tensors = []
    for image in images:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read {path} as an image: {error}") from error
    k = min(topk, len(loaded.class_names))
    results = []
    for start in range(0, len(tensors), batch_size):
        batch = torch.stack(tensors[start : start + batch_size]).to(dev)
        probs = model(batch).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for offset, (vals, idxs) in enumerate(zip(values.tolist(), indices.tolist())):
            results.append({
                "image": str(images[start + offset]),
                "top": [{"index": i, "label": loaded.class_names[i], "prob": v} for i, v in zip(idxs, vals)],
            })
    return results
