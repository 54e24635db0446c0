"""Training configuration, data pipeline, engine, eval and predict (fast paths)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import fcaformer
from fcaformer.cli import main as cli_main
from fcaformer.fast import is_fused
from fcaformer.train import ConfigError, DataError, list_presets, load_config
from fcaformer.train.config import config_from_dict
from fcaformer.train.data import (
    ImageDataset,
    ResumableSampler,
    build_eval_transform,
    scan_image_folder,
)
from fcaformer.train.datasets import load_image_lists
from fcaformer.train.engine import Trainer, TrainingDiverged, train
from fcaformer.train.inference import load_any_model
from fcaformer.train.state import list_states, load_latest_state
from fcaformer.weights import load_model
from tests._train_helpers import make_image_folder, tiny_overrides
from tests.conftest import shared_path


# ------------------------------------------------------------------------------------------------ config
def test_presets_exist_and_imagenet_matches_the_paper() -> None:
    assert {"default", "imagenet", "imagenette", "repro"} <= set(list_presets())
    c = load_config("imagenet", ["data.root=/x"])
    assert (c.optim.opt, c.optim.lr, c.optim.lr_base_batch, c.optim.weight_decay, c.optim.eps) == (
        "adamw", 2e-3, 1024, 0.05, 1e-8)
    assert (c.run.epochs, c.optim.warmup_epochs, c.optim.min_lr, c.optim.ema_decay) == (300, 20, 1e-6, 0.9999)
    assert (c.aug.auto_augment, c.aug.mixup, c.aug.cutmix, c.aug.smoothing, c.aug.re_prob, c.aug.color_jitter) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25, 0.4)
    assert c.data.interpolation == "bicubic" and c.optim.ema


def test_overrides_types_and_round_trip() -> None:
    c = load_config("default", ["run.epochs=3", "optim.lr=1e-3", "model.kwargs.depths=[1,1,1,1]",
                                "aug.scale=[0.5,1.0]"])
    assert c.run.epochs == 3 and c.optim.lr == 1e-3 and c.aug.scale == (0.5, 1.0)
    assert c.model.name == "fcaformer_atto" and c.model.kwargs == {"depths": [1, 1, 1, 1]}
    assert config_from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("override", "needle"),
    [("optim.lr_typo=1", "unknown key optim.lr_typo"), ("foo.x=1", "unknown section 'foo'"),
     ("run.epochs=abc", "run.epochs expects int"), ("data.img_size=16", "must be >= 32"),
     ("run.amp=fp8", "run.amp"), ("data.dataset=imagefolder", "data.root is required"), ("noequals", "key=value")],
)
def test_bad_config_is_a_clear_error(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config("default", [override])


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="imagenette"):
        load_config("nope")


# -------------------------------------------------------------------------------------------------- data
def test_digits_are_real_upsampled_images() -> None:
    from sklearn.datasets import load_digits

    train_list, val_list = load_image_lists(load_config("default").data)
    assert len(train_list) + len(val_list) == len(load_digits().target) == 1797
    img, label = train_list.samples[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10
    counts = np.bincount([lbl for _, lbl in val_list.samples], minlength=10)
    assert counts.min() >= 34  # stratified 20 %


def test_resumable_sampler_shards_and_resumes() -> None:
    data = list(range(100))
    full = [list(ResumableSampler(data, 8, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert len(full[0]) == len(full[1]) == 48  # 50 per rank, 6 full batches of 8
    assert not {i for i, _ in full[0]} & {i for i, _ in full[1]}
    sampler = ResumableSampler(data, 8, seed=3)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    sampler.set_epoch(2, start_batch=5)
    assert list(sampler) == epoch2[40:] and len(sampler) == len(epoch2) - 40
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in epoch2]  # reshuffled
    assert len({s for _, s in epoch2}) == len(epoch2)  # one augmentation seed per sample


def test_seeded_augmentation_is_a_function_of_the_seed() -> None:
    config = load_config("default", ["aug.color_jitter=0.4"])
    train_list, _ = load_image_lists(config.data)
    from fcaformer.train.data import build_transforms

    dataset = ImageDataset(train_list, build_transforms(config)[0])
    a, b = dataset[(0, 123)][0], dataset[(0, 123)][0]
    assert torch.equal(a, b) and not torch.equal(a, dataset[(0, 124)][0])


def test_corrupt_files_are_skipped_and_named(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, ["a", "b"], 3)
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "train" / "b" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="broken.jpg"):
        images = scan_image_folder(root / "train")
    assert len(images) == 6 and len(images.skipped) == 2
    assert any(s.endswith("notes.txt") for s in images.skipped)


def test_folder_without_readable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no readable image"):
            scan_image_folder(tmp_path / "train")
    with pytest.raises(DataError, match="dataset root not found"):
        load_image_lists(load_config("default", [f"data.root={tmp_path}/missing", "data.dataset=imagefolder"]).data)


def test_val_split_is_stratified_and_disjoint(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, ["a", "b"], 10)
    config = load_config("default", [f"data.root={root}", "data.dataset=imagefolder", "data.val_dir=none",
                                     "data.val_split=0.2"])
    train_list, val_list = load_image_lists(config.data)
    assert len(train_list) == 16 and len(val_list) == 4
    assert not {p for p, _ in train_list.samples} & {p for p, _ in val_list.samples}


def _write_fake_cifar10(root: Path) -> None:
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar_on_disk_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    with pytest.raises(DataError, match="never downloads"):
        load_image_lists(load_config("default", [f"data.root={tmp_path}", "data.dataset=cifar10"]).data)
    _write_fake_cifar10(tmp_path)
    # our fake files have other md5 sums than the real ones torchvision checks
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    train_list, val_list = load_image_lists(load_config("default", [f"data.root={tmp_path}",
                                                                    "data.dataset=cifar10"]).data)
    assert len(train_list) == 20 and len(val_list) == 4 and train_list.class_names[3] == "c3"
    assert train_list.samples[0][0].size == (32, 32)


# ------------------------------------------------------------------------------------------------ engine
def test_train_writes_a_complete_run_folder(tmp_path: Path) -> None:
    # the ImageNet recipe's augmentation and regularisation, scaled down: RandAugment, Mixup/CutMix, random
    # erasing, EMA; and TensorBoard logging
    config = load_config("default", tiny_overrides(
        tmp_path / "run", "run.epochs=2", "optim.ema=true", "optim.ema_decay=0.5", "aug.mixup=0.8",
        "aug.cutmix=1.0", "aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.re_prob=0.25", "run.tensorboard=true"))
    summary = train(config)
    out = tmp_path / "run"
    for name in ("config.yaml", "model.pt", "metrics.jsonl", "curves.png", "results.json", "confusion.png"):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in history)
    assert summary["val"]["images"] == 20 and summary["steps"] == 10
    # the lr is the linearly scaled one, and it decays by the cosine schedule
    assert summary["lr"] == pytest.approx(2e-3 * 8 / 64)
    # model.pt is rebuilt by fcaformer.weights.load_model alone and reproduces the reported accuracy
    model, ckpt = load_model(out / "model.pt")
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    _, val_list = load_image_lists(config.data)
    dc = ckpt["data_config"]
    tf = build_eval_transform(dc["img_size"], dc["crop_pct"], dc["interpolation"], dc["mean"], dc["std"])
    x = torch.stack([tf(img) for img, _ in val_list.samples])
    y = torch.tensor([label for _, label in val_list.samples])
    with torch.no_grad():
        top1 = 100 * (model(x).argmax(1) == y).float().mean().item()
    assert top1 == pytest.approx(summary["val"]["top1"], abs=1e-4)
    assert len(list_states(out / "checkpoints")) == 2  # keep_ckpts
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config("default", tiny_overrides(tmp_path / "run", "run.epochs=2", "run.ckpt_every_steps=1"))
    trainer = Trainer(config)
    original = trainer.criterion
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = original(logits, target)
        return loss * float("nan") if calls["n"] == 7 else loss

    trainer.criterion = poisoned
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    state, _ = load_latest_state(tmp_path / "run")
    assert state["step"] == 6 and state["epoch"] == 1 and state["batch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    """Two accumulated batches of 4 give the update of one batch of 8 (same samples, same lr).

    A BatchNorm-free network (a tiny timm ViT) and SGD (linear in the gradient; Adam would amplify float noise
    in zero-gradient parameters such as the key bias) make the two comparable."""
    common = ["run.epochs=1", "run.max_steps=1", "optim.warmup_epochs=0", "run.deterministic=true",
              "optim.lr_base_batch=8", "optim.opt=sgd", "model.name=vit_tiny_patch16_224", "model.kwargs={}",
              "model.kwargs.patch_size=8", "model.kwargs.embed_dim=32", "model.kwargs.depth=1",
              "model.kwargs.num_heads=1"]
    big = Trainer(load_config("default", tiny_overrides(tmp_path / "a", *common)))
    small = Trainer(load_config("default", tiny_overrides(tmp_path / "b", *common, "run.batch_size=4",
                                                          "optim.accum_steps=2")))
    assert big.lr == small.lr and big.global_batch == small.global_batch == 8
    small.model.load_state_dict(big.model.state_dict())
    before = {k: v.clone() for k, v in big.model.state_dict().items()}
    big.sampler.set_epoch(0)
    small.sampler.set_epoch(0)
    assert [i for i, _ in big.sampler][:8] == [i for i, _ in small.sampler][:8]  # the same 8 samples
    big.fit()
    small.fit()
    assert small.pos.step == big.pos.step == 1
    changed = 0
    for name, a in big.model.state_dict().items():
        torch.testing.assert_close(a, small.model.state_dict()[name], atol=1e-6, rtol=1e-5, msg=name)
        changed += not torch.equal(a, before[name])
    assert changed > 0  # an update happened


# ---------------------------------------------------------------------------------------- eval & predict
@pytest.fixture(scope="module")
def trained_folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path_factory.mktemp("data"), ["n01440764", "n02102040"], 6)
    (root / "classes.json").write_text(json.dumps({"n01440764": "tench", "n02102040": "springer"}))
    (root / "val" / "n01440764" / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path_factory.mktemp("run")
    code = cli_main(["train", "--data", str(root), "--config", "default", "--epochs", "1", "--img-size", "32",
                     "--batch-size", "4", "--output", str(out), "--threads", "1", "--no-progress",
                     "--set", *tiny_overrides(out)[:3]])
    assert code == 0
    return root, out


def test_cli_train_on_image_folder_counts_skipped(trained_folder_run: tuple[Path, Path]) -> None:
    _, out = trained_folder_run
    results = json.loads((out / "results.json").read_text())
    # relative to the dataset root: results carry nothing of the machine they were made on
    assert results["skipped_files"] == 1 and results["skipped_list"] == ["val/n01440764/bad.png"]
    assert results["class_names"] == ["tench", "springer"] and results["val_images"] == 6


def test_eval_project_checkpoint_matches_training(trained_folder_run: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root, out = trained_folder_run
    assert cli_main(["eval", str(out / "model.pt"), "--data", str(root), "--json", "--output", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert report["top1"] == pytest.approx(results["val"]["top1"])
    assert report["images"] == 6 and set(report["per_class_acc"]) == {"tench", "springer"}
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "eval.json").is_file()
    assert report["fast_path"] is True
    # without --data the training dataset recorded in the checkpoint is used; --faithful skips the fusion
    assert cli_main(["eval", str(out / "model.pt"), "--json", "--faithful"]) == 0
    faithful = json.loads(capsys.readouterr().out)
    assert faithful["fast_path"] is False and faithful["top1"] == pytest.approx(results["val"]["top1"])
    assert faithful["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_load_any_model_fuses_fcaformer_models_only(trained_folder_run: tuple[Path, Path]) -> None:
    _, out = trained_folder_run
    fast, faithful = load_any_model(out / "model.pt"), load_any_model(out / "model.pt", fast=False)
    assert fast.fused and is_fused(fast.model) and not faithful.fused and not is_fused(faithful.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = faithful.model(x)
        assert ((fast.model(x) - ref).norm() / ref.norm()).item() < 1e-5
    assert not load_any_model("resnet10t").fused  # not an FcaFormer: left as it is


def test_eval_timm_name_restricts_imagenet_logits(trained_folder_run: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture) -> None:
    root, _ = trained_folder_run
    assert cli_main(["eval", "resnet10t", "--data", str(root), "--json", "--img-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["restricted_to_dataset_classes"] and report["images"] == 6
    torch.manual_seed(0)  # the same random init as inside the command (the autouse fixture seeded 0)
    model = timm.create_model("resnet10t").eval()
    tf = build_eval_transform(64, 0.95, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    val = scan_image_folder(root / "val", verify=True)
    x = torch.stack([tf(_rgb(p)) for p, _ in val.samples])
    with torch.no_grad():
        pred = model(x)[:, [0, 217]].argmax(1)  # tench = 0, English springer = 217 in ImageNet-1k
    expected = 100 * (pred == torch.tensor([lbl for _, lbl in val.samples])).float().mean().item()
    assert report["top1"] == pytest.approx(expected)


def _rgb(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def test_eval_official_release_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fixture = shared_path("parity", "official_custom_cls_cab2.pt")
    raw = torch.load(fixture, weights_only=True)
    ckpt = tmp_path / "release.pth"
    torch.save({"model": raw["state_dict"]}, ckpt)
    root = make_image_folder(tmp_path / "data", [f"c{i}" for i in range(10)], 2, size=48)
    assert cli_main(["eval", str(ckpt), "--data", str(root), "--json", "--img-size", "160"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = fcaformer.load_official(ckpt)
    tf = build_eval_transform(160, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    val = scan_image_folder(root / "val")
    x = torch.stack([tf(_rgb(p)) for p, _ in val.samples])
    with torch.no_grad():
        pred = model(x).argmax(1)
    expected = 100 * (pred == torch.tensor([lbl for _, lbl in val.samples])).float().mean().item()
    assert report["kind"] == "official" and report["top1"] == pytest.approx(expected)


def test_predict_topk_json_and_errors(trained_folder_run: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    root, out = trained_folder_run
    images = sorted(str(p) for p in (root / "val" / "n02102040").glob("*.png"))
    assert cli_main(["predict", *images, "--model", str(out / "model.pt"), "--topk", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predictions] == images
    model, ckpt = load_model(out / "model.pt")
    # the transform the run recorded (the default preset crops nothing); with BN statistics that lagged the
    # weights the outputs hardly depended on the input, so a wrong crop went unnoticed here
    dc = ckpt["data_config"]
    tf = build_eval_transform(dc["img_size"], dc["crop_pct"], dc["interpolation"], dc["mean"], dc["std"])
    with torch.no_grad():
        probs = model(torch.stack([tf(_rgb(p)) for p in images])).softmax(1)
    for pred, row in zip(predictions, probs):
        top = pred["top"]
        assert {t["label"] for t in top} == {"tench", "springer"}
        assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-5)
        assert top[0]["prob"] >= top[1]["prob"]
        assert top[0]["prob"] == pytest.approx(row.max().item(), abs=1e-5)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert cli_main(["predict", str(bad), "--model", str(out / "model.pt")]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert cli_main(["predict", images[0], "--model", "no_such_model_or_file"]) == 2


def test_bf16_trainings_repeated_in_one_process_stay_finite(tmp_path: Path) -> None:
    # Regression: from the second bf16 CPU training of a process on, the merge conv's weight gradient picked up
    # stale memory (NaN) on the tiny model's 2x2 stage-3 grid, and the run stopped at its first step.
    for index in range(2):
        summary = train(load_config("default", tiny_overrides(tmp_path / f"run{index}", "run.amp=bf16",
                                                              "run.max_steps=2", "optim.clip_grad=1.0")))
        assert summary["steps"] == 2 and np.isfinite(summary["val"]["loss"])


def test_bf16_autocast_and_channels_last_train(tmp_path: Path) -> None:
    # As the CLI runs it, in a fresh process.
    overrides = tiny_overrides(tmp_path / "run", "run.amp=bf16", "run.channels_last=true", "run.max_steps=2",
                               "optim.clip_grad=1.0")
    subprocess.run([sys.executable, "-m", "fcaformer", "train", "--set", *overrides], check=True,
                   capture_output=True, text=True)
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["val"]["loss"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        Trainer(load_config("default", tiny_overrides(tmp_path / "fp16", "run.amp=fp16", "run.device=cpu")))


def test_tensorboard_without_its_package_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    code = cli_main(["train", "--tensorboard", "--set", *tiny_overrides(tmp_path / "run")])
    assert code == 2
    assert "pip install 'fcaformer[tensorboard]'" in capsys.readouterr().err
