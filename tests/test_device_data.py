"""The on-device data path (fcaformer.train.device_data): augmentation geometry against independent computations,
eval crops against timm's transform, packed datasets (round trip, damage, mistakes), resumable loaders, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fcaformer.cli import main as cli_main
from fcaformer.train import load_config
from fcaformer.train.data import DataError, build_eval_transform
from fcaformer.train.device_data import (
    DeviceAugment,
    DeviceEvalLoader,
    DeviceSplit,
    DeviceTrainLoader,
    color_jitter,
    crop_flip_grid,
    eval_crop,
    load_pack,
    pack_image_folder,
    read_pack_meta,
)
from fcaformer.train.engine import Trainer
from tests._train_helpers import make_image_folder, tiny_overrides
from tests.conftest import shared_path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ramp_images(batch: int = 3, size: int = 16) -> torch.Tensor:
    """uint8 images whose pixel value encodes its column (red), row (green) and image index (blue)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([cols * 255 // (size - 1), rows * 255 // (size - 1), torch.zeros_like(rows)])
    images = base.unsqueeze(0).repeat(batch, 1, 1, 1)
    images[:, 2] = torch.arange(batch).view(-1, 1, 1) * 40
    return images.to(torch.uint8)


# ------------------------------------------------------------------------------------------- augmentation
def test_full_crop_without_flip_is_a_plain_resize() -> None:
    images = ramp_images()
    grid = crop_flip_grid(3, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                          generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    assert torch.allclose(out, images.float(), atol=1e-3)  # same size: the identity


def test_flip_mirrors_the_columns() -> None:
    images = ramp_images()
    grid = crop_flip_grid(3, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0,
                          generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    assert torch.allclose(out, images.float().flip(-1), atol=1e-3)


def test_crops_cover_the_requested_area_and_stay_inside_the_image() -> None:
    """Crop sides from the grid's extent: area fraction within ``scale``, aspect within ``ratio``, inside [-1, 1]."""
    batch, scale, ratio = 4000, (0.2, 0.6), (3 / 4, 4 / 3)
    grid = crop_flip_grid(batch, 8, scale, ratio, hflip=0.5, generator=torch.Generator().manual_seed(1),
                          device=torch.device("cpu"))
    # pixel centres of an 8-px output sit at +-7/8 of the half-side: rescale the extent to the full crop
    width = (grid[:, 0, :, 0].amax(1) - grid[:, 0, :, 0].amin(1)) * 8 / 7 / 2
    height = (grid[:, :, 0, 1].amax(1) - grid[:, :, 0, 1].amin(1)) * 8 / 7 / 2
    area, aspect = width * height, width / height
    unclamped = (width < 0.999) & (height < 0.999)
    assert area[unclamped].min() >= scale[0] - 1e-4 and area.max() <= scale[1] + 1e-4
    assert aspect[unclamped].min() >= ratio[0] - 1e-4 and aspect[unclamped].max() <= ratio[1] + 1e-4
    assert grid.abs().max() <= 1 + 1e-5
    flipped = grid[:, 0, 0, 0] > grid[:, 0, -1, 0]
    assert 0.45 < flipped.float().mean() < 0.55


def test_color_jitter_zero_strength_is_identity_and_factors_are_per_image() -> None:
    images = torch.rand(6, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(color_jitter(images, 0.0, generator), images, atol=1e-6)
    jittered = color_jitter(images, 0.5, generator)
    assert jittered.min() >= 0 and jittered.max() <= 1
    ratios = jittered.mean((1, 2, 3)) / images.mean((1, 2, 3))
    assert ratios.std() > 0.01  # different draws per image


def test_augment_is_a_function_of_the_seed() -> None:
    augment = DeviceAugment(12, scale=(0.3, 1.0), color_jitter=0.3, mean=MEAN, std=STD)
    images = ramp_images(4)
    first = augment(images, torch.Generator().manual_seed(5))
    assert first.shape == (4, 3, 12, 12) and first.dtype == torch.float32
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(6)))


def test_eval_crop_matches_timms_eval_transform_on_a_real_image() -> None:
    path = sorted(shared_path("data", "imagenette-160", "val").rglob("*.jpg"))[0]
    image = Image.open(path).convert("RGB")  # 160 x 160
    reference = build_eval_transform(128, 0.875, "bicubic", MEAN, STD)(image)  # resize 146, crop 128
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    ours = eval_crop(pixels, 128, 0.875, MEAN, STD)[0]
    assert ours.shape == reference.shape
    # PIL and torch resample slightly differently; one normalised grey level is ~0.017
    assert (ours - reference).abs().mean() < 0.03
    stored = eval_crop(pixels, 128, 128 / 160, MEAN, STD)[0]  # store size == resize size: a pure centre crop
    expected = (pixels[0, :, 16:144, 16:144].float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD).view(3, 1, 1)
    assert torch.allclose(stored, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ loaders
def _split(count: int = 40, size: int = 16) -> DeviceSplit:
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    return DeviceSplit(images, torch.arange(count) % 4)


def test_train_loader_resumes_mid_epoch_with_the_same_batches() -> None:
    split = _split()
    augment = DeviceAugment(12, mean=MEAN, std=STD)
    loader = DeviceTrainLoader(split, augment, 8, seed=3)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == loader.batches_per_epoch() == 5
    loader.set_epoch(2, start_batch=3)
    resumed = list(loader)
    assert len(resumed) == len(loader) == 2
    for (a, la), (b, lb) in zip(full[3:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], full[0][1]) or not torch.equal(next(iter(loader))[0], full[0][0])


def test_loaders_shard_disjointly_over_ranks() -> None:
    split = _split(41)
    augment = DeviceAugment(12, mean=MEAN, std=STD)
    seen = []
    for rank in range(2):
        loader = DeviceTrainLoader(split, augment, 4, rank=rank, world_size=2, seed=0)
        loader.set_epoch(0)
        seen.append(torch.cat([labels for _, labels in loader]))
    assert len(seen[0]) == len(seen[1]) == 20
    evaluated = [torch.cat([labels for _, labels in DeviceEvalLoader(split, 8, 12, 1.0, MEAN, STD, rank=r,
                                                                     world_size=2)]) for r in range(2)]
    assert sum(len(e) for e in evaluated) == 41  # every val image exactly once


# ------------------------------------------------------------------------------------------ packed datasets
def test_pack_round_trip_skips_damaged_files_and_keeps_class_names(tmp_path) -> None:
    root = make_image_folder(tmp_path / "data", ["cat", "dog"], per_class=4, size=48)
    (root / "classes.json").write_text(json.dumps({"cat": "tabby cat", "dog": "beagle"}))
    good = root / "train" / "cat" / "img0.png"
    (root / "train" / "cat" / "broken.png").write_bytes(good.read_bytes()[:60])  # truncated copy
    with pytest.warns(UserWarning, match="broken.png"):
        path = pack_image_folder(root, tmp_path / "p.npz", size=32, image_format="PNG")
    meta = read_pack_meta(path)
    assert meta["counts"] == {"train": 8, "val": 4} and meta["class_names"] == ["tabby cat", "beagle"]
    train = load_pack(path, "train")
    assert len(train) == 8 and train.class_names == ["tabby cat", "beagle"]
    original = np.asarray(Image.open(good).convert("RGB").resize((32, 32), Image.BICUBIC))
    restored = np.asarray(train.samples[0][0])
    assert restored.shape == (32, 32, 3) and np.abs(restored.astype(int) - original).max() <= 1  # lossless PNG


def test_pack_mistakes_give_one_clear_error(tmp_path, capsys) -> None:
    assert cli_main(["pack", str(tmp_path / "missing"), str(tmp_path / "p.npz")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert cli_main(["pack", str(tmp_path), str(tmp_path / "p.zip")]) == 2
    assert ".npz" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read packed dataset"):
        load_pack(tmp_path / "bad.npz", "train")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not an fcaformer packed dataset"):
        load_pack(tmp_path / "other.npz", "train")


def test_trainer_on_device_trains_from_a_pack_through_the_cli(tmp_path, capsys) -> None:
    root = make_image_folder(tmp_path / "data", ["a", "b", "c"], per_class=12, size=40)
    assert cli_main(["pack", str(root), str(tmp_path / "p.npz"), "--size", "40"]) == 0
    assert "packed 36 train, 18 val images of 3 classes" in capsys.readouterr().out
    overrides = tiny_overrides(tmp_path / "run", "data.on_device=true", "run.epochs=3", "run.log_every=2",
                               "data.train_per_class=null", "data.val_per_class=null", "aug.color_jitter=0.2",
                               "optim.lr=5e-3", "optim.lr_base_batch=8")
    config = load_config("default", [*overrides, "data.dataset=packed", f"data.root={tmp_path / 'p.npz'}"])
    trainer = Trainer(config)
    assert isinstance(trainer.train_set, DeviceSplit) and trainer.train_set.images.shape == (36, 3, 32, 32)
    summary = trainer.fit()
    losses = [h["train_loss"] for h in trainer.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert summary["val_images"] == 18 and (tmp_path / "run" / "model.pt").exists()
