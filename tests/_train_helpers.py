"""Tiny datasets and configs shared by the training tests (fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A tiny hybrid: head dim 32, one Fca block with cross tokens in stage 3.
TINY_MODEL = [
    "model.kwargs.dims=[16,16,32,32]",
    "model.kwargs.depths=[1,1,2,1]",
    "model.kwargs.num_heads=[1,1]",
]


def tiny_overrides(output: Path, *extra: str) -> list[str]:
    """Digits, 4 train / 2 val images per class, 32 px, batch 8: 5 batches per epoch."""
    return [
        *TINY_MODEL,
        "data.train_per_class=4",
        "data.val_per_class=2",
        "run.batch_size=8",
        "run.epochs=1",
        "run.threads=1",
        "run.progress=false",
        f"run.output={output}",
        *extra,
    ]


def make_image_folder(root: Path, classes: list[str], per_class: int, size: int = 40, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png`` of random images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array([(label * 80) % 256, 128, 255 - (label * 80) % 256])
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root
