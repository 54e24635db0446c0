"""What a user fine-tuning and deploying a classifier on their own data tripped over (issue 24): predict on folders
and globs, int8 calibration samples, one fine-tuning recipe, portable and readable files, hub metadata, exported
metadata, quiet runs and fast start-up."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from fcaformer.cli import main
from fcaformer.deploy import calibration_and_check_images, list_images
from fcaformer.files import atomic_json_dump, portable_path
from fcaformer.train import load_config
from fcaformer.weights import read_hub_folder, save_model
from fcaformer.weights.hub import write_hub_folder
from tests._train_helpers import TINY_MODEL, make_image_folder, tiny_overrides
from tests.conftest import REPO_ROOT

ATTO = {"num_classes": 3, "img_size": 32}


def _atto_checkpoint(path: Path, **extra) -> Path:
    model = timm.create_model("fcaformer_atto", **ATTO).eval()
    data_config = {"img_size": 32, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    return save_model(path, model, "fcaformer_atto", ATTO, class_names=["cat", "dog", "owl"],
                      data_config=data_config, **extra)


def _images(folder: Path, count: int, size: int = 36) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ 1. predict
def test_predict_takes_folders_and_globs_and_skips_unreadable_files(tmp_path: Path, capsys, monkeypatch) -> None:
    _atto_checkpoint(tmp_path / "run" / "model.pt")
    _images(tmp_path / "predir", 3)
    _images(tmp_path / "predir" / "sub", 1)
    (tmp_path / "predir" / "notes.txt").write_text("not an image")
    (tmp_path / "predir" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "predir", "--model", "run/model.pt", "--json"]) == 0
    out = capsys.readouterr()
    records = json.loads(out.out)
    assert [r["image"] for r in records] == ["predir/broken.jpg", "predir/img0.png", "predir/img1.png",
                                             "predir/img2.png", "predir/sub/img0.png"]
    assert "error" in records[0] and all(len(r["top"]) == 3 for r in records[1:])
    assert "skipped predir/broken.jpg" in out.err
    # a glob (as the shell expands it, and quoted for us to expand): the text file is named, not fatal
    assert main(["predict", "predir/*", "--model", "run/model.pt", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["image"] for r in records if "error" in r} == {"predir/broken.jpg", "predir/notes.txt"}
    assert sum("top" in r for r in records) == 4  # the three images and, through the folder it matches, sub/img0
    # inputs are checked before the model is read: a missing image is reported even with a damaged model file
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["predict", "nowhere/x.png", "--model", "bad.pt"]) == 2
    assert "image not found: nowhere/x.png" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 2. int8 calibration
def _class_folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:03d}.png").write_bytes(b"")  # only names matter to the sampling
    return root


def test_calibration_and_check_are_class_balanced_random_and_disjoint(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "train", 10, 40)
    calibration, check = calibration_and_check_images(root, 30, 20)
    classes = lambda paths: [p.parent.name for p in paths]  # noqa: E731
    assert sorted(set(classes(calibration))) == [f"class{c}" for c in range(10)]
    assert all(classes(calibration).count(f"class{c}") == 3 for c in range(10))
    assert all(classes(check).count(f"class{c}") == 2 for c in range(10))
    assert not set(calibration) & set(check)
    assert calibration != sorted(calibration)  # drawn at random, not in path order
    # fewer files than calibration + check: shared in proportion, still disjoint and covering every class
    calibration, check = calibration_and_check_images(root, 300, 1700)
    assert len(calibration) == 60 and len(check) == 340 and not set(calibration) & set(check)
    assert len(set(classes(calibration))) == 10 and len(set(classes(check))) == 10
    # a separate check folder (a validation split)
    val = _class_folder(tmp_path / "val", 10, 5)
    calibration, check = calibration_and_check_images(root, 20, 30, check_root=val)
    assert all(p.is_relative_to(val) for p in check) and len(set(classes(check))) == 10
    assert list_images(root, seed=0) == list_images(root, seed=0) != list_images(root, seed=1)


# ------------------------------------------------------------------------------------ 3. one recipe
def _recipe_commands() -> list[str]:
    """Every ``fcaformer train ... --pretrained ...`` command in the README and the training guide."""
    commands = []
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "training.md", REPO_ROOT / "docs" / "finetuning.md"):
        text = doc.read_text().replace("\\\n", " ")
        commands += [line.strip() for line in text.splitlines()
                     if line.strip().startswith("fcaformer train") and "--pretrained" in line]
    return commands


def test_the_documented_fine_tuning_recipe_is_the_measured_one(tmp_path: Path, capsys) -> None:
    commands = _recipe_commands()
    assert len(commands) >= 2
    for command in commands:
        argv = command.split("#")[0].split()[1:]
        argv = [str(tmp_path) if a == "ROOT" else a for a in argv]
        assert "--layer-decay" not in argv and "--lr" not in argv, command
        assert main([*argv, "--print-config"]) == 0, command
        config = yaml.safe_load(capsys.readouterr().out)
        optim, run = config["optim"], config["run"]
        # what docs/finetuning.md measured: AdamW, lr 2e-3 for a batch of 32, no layer decay, head x 0.001
        assert optim["lr"] * run["batch_size"] / optim["lr_base_batch"] == pytest.approx(2e-3), command
        assert optim["layer_decay"] is None and config["model"]["head_init_scale"] == 0.001, command
    text = (REPO_ROOT / "docs" / "finetuning.md").read_text()
    assert "lr 2e-3" in text and "fcaformer train" in text


# --------------------------------------------------------------------------- 5, 6. portable, readable files
def test_portable_paths() -> None:
    assert portable_path("weights/x.pt") == "weights/x.pt"
    assert portable_path(str(Path.cwd() / "a" / "b.pt")) == "a/b.pt"
    assert portable_path("/elsewhere/runs/model.safetensors") == "runs/model.safetensors"
    assert portable_path("local-dir:/elsewhere/hub/l1") == "local-dir:hub/l1"
    assert portable_path("hf-hub:org/name") == "hf-hub:org/name"


def test_fine_tuning_records_no_absolute_path(tmp_path: Path, monkeypatch) -> None:
    source = _atto_checkpoint(tmp_path / "elsewhere" / "source.safetensors").resolve()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["train", "--config", "default", "--model", "fcaformer_atto", "--pretrained", str(source),
            "--set", *tiny_overrides(Path("run"))[3:], "data.img_size=32"]
    assert main(argv) == 0
    written = [work / "run" / "config.yaml", work / "run" / "results.json"]
    for path in written:
        assert str(tmp_path) not in path.read_text(), path
    checkpoint = torch.load(work / "run" / "model.pt", weights_only=True)
    assert checkpoint["train_config"]["model"]["pretrained"] == "elsewhere/source.safetensors"
    assert str(tmp_path) not in json.dumps(checkpoint["train_config"])


def test_written_files_get_the_mode_of_a_normal_write(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = atomic_json_dump({"a": 1}, tmp_path / "report.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        model = timm.create_model("fcaformer_atto", **ATTO).eval()
        out = write_hub_folder(model, tmp_path / "hub", model_args=ATTO,
                               data_config={"img_size": 32, "crop_pct": 1.0, "interpolation": "bicubic",
                                            "mean": [0.5] * 3, "std": [0.5] * 3})
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    finally:
        os.umask(previous)


# --------------------------------------------------------------------------------- 7. hub metadata
def test_hub_folder_says_what_the_weights_were_trained_on(tmp_path: Path, capsys) -> None:
    train_config = {"data": {"dataset": "imagefolder", "root": "data/CIFAR-10 png", "img_size": 64},
                    "run": {"epochs": 4}, "model": {"pretrained": "fca_release.safetensors"}}
    model = timm.create_model("fcaformer_l1", num_classes=3, img_size=64, dims=(16, 16, 32, 32),
                              depths=(1, 1, 2, 1), num_heads=(1, 1)).eval()
    source = save_model(tmp_path / "model.pt", model, "fcaformer_l1",
                        {"num_classes": 3, "img_size": 64, "dims": (16, 16, 32, 32), "depths": (1, 1, 2, 1),
                         "num_heads": (1, 1)},
                        class_names=["a", "b", "c"], train_config=train_config,
                        metrics={"epoch": 4, "val_top1": 52.3, "val_top5": 97.1},
                        data_config={"img_size": 64, "crop_pct": 0.875, "interpolation": "bicubic",
                                     "mean": [0.5] * 3, "std": [0.5] * 3})
    assert main(["convert", str(source), str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["tag"] == "cifar_10_png" and cfg["tag"] != "in1k"
    assert tuple(cfg["pool_size"]) == (2, 2)  # 64 px / 32, not the 224 px default's 7x7
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "imagefolder 'CIFAR-10 png'" in card and "3 classes" in card and "64 px" in card
    assert "val top-1 52.30 %" in card and "fine-tuned from `fca_release.safetensors`" in card
    assert read_hub_folder(tmp_path / "hub")["record"]["training"]["classes"] == 3


# ---------------------------------------------------------------------- 8. metadata of the exported files
def test_exports_carry_class_names_and_preprocessing(tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    openvino = pytest.importorskip("openvino")
    import onnxruntime

    _atto_checkpoint(tmp_path / "cifar" / "model.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", "cifar/model.pt", "--format", "onnx"]) == 0
    assert main(["export", "--checkpoint", "cifar/model.pt", "--format", "openvino", "--no-check"]) == 0
    capsys.readouterr()
    # default names: the run folder and the architecture, not "model"
    onnx_file, ir_file = tmp_path / "cifar_fcaformer_atto_32x32.onnx", tmp_path / "cifar_fcaformer_atto_32x32.xml"
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    from_onnx = json.loads(session.get_modelmeta().custom_metadata_map["fcaformer"])
    ir = openvino.Core().read_model(str(ir_file))
    from_ir = json.loads(ir.get_rt_info(["fcaformer"]).astype(str))
    for meta in (from_onnx, from_ir):
        assert meta["class_names"] == ["cat", "dog", "owl"]
        pre = meta["preprocessing"]
        assert pre["resize"] == 36 and pre["crop"] == [32, 32] and pre["interpolation"] == "bicubic"
        assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
        assert meta["model"] == "fcaformer_atto" and meta["input"]["color"] == "RGB"


# ------------------------------------------------------------------------------------ 10. smaller ones
def test_no_progress_hides_the_data_scan_bars(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", ["a", "b"], 4, size=32)
    done = subprocess.run(
        [sys.executable, "-m", "fcaformer", "train", "--data", str(root), "--model", "fcaformer_l1", "--img-size",
         "32", "--epochs", "1", "--batch-size", "4", "--no-progress", "--output", str(tmp_path / "run"),
         "--set", *TINY_MODEL, "run.threads=1", "data.workers=0"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scanning" not in done.stderr and "it/s" not in done.stderr


def test_head_init_scale_without_pretrained_is_an_error(capsys) -> None:
    assert main(["train", "--head-init-scale", "0.001", "--print-config"]) == 2
    assert re.search(r"--head-init-scale only applies when fine-tuning: add --pretrained", capsys.readouterr().err)
    with pytest.warns(UserWarning, match="head_init_scale=0.001 has no effect without model.pretrained"):
        load_config("default", ["model.head_init_scale=0.001"])


def test_print_config_does_not_import_plotting_or_dataset_libraries() -> None:
    heavy = ("matplotlib", "sklearn", "scipy", "onnx", "onnxruntime", "openvino", "pycocotools")
    code = ("import sys; from fcaformer.cli import main; main(['train', '--print-config']); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_int8_with_a_minimum_agreement_hands_nncf_the_agreement_with_fp32(monkeypatch) -> None:
    """The wiring of ``--min-agreement``: NNCF's accuracy control gets the allowed drop (1 - agreement), control
    items labelled with the fp32 model's own top-1, and a metric under which the fp32 model scores 1 per item. (That
    it reaches 99 % on a user-like set is measured by benchmarks/int8_calibration.py: docs/int8_calibration.md.)"""
    nncf = pytest.importorskip("nncf")
    from fcaformer.deploy import compile_openvino, inference_graph, quantize_openvino, to_openvino

    model = timm.create_model("fcaformer_atto", num_classes=10).eval()
    images = torch.randn(20, 3, 32, 32)
    fp32 = to_openvino(inference_graph(model, "openvino", (32, 32)), (32, 32))
    seen = {}

    def accuracy_control(model, calibration, validation, metric, max_drop, drop_type, **options):
        seen.update(calibration=list(calibration.get_data()), validation=list(validation.get_data()), metric=metric,
                    max_drop=max_drop, drop_type=drop_type, options=options)
        return model

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", accuracy_control)
    quantize_openvino(fp32, images[:8], images[8:], min_agreement=0.99)
    assert seen["max_drop"] == pytest.approx(0.01) and seen["drop_type"] == nncf.DropType.ABSOLUTE
    assert len(seen["calibration"]) == 8 and len(seen["validation"]) == 12
    compiled = compile_openvino(fp32)
    labels = compiled(images[8:].numpy())[0].argmax(-1).tolist()
    assert [label for _, label in seen["validation"]] == labels
    assert seen["metric"](compiled, seen["validation"]) == (1.0, [1.0] * 12)
    flipped = [(image, (label + 1) % 10) for image, label in seen["validation"]]
    assert seen["metric"](compiled, flipped) == (0.0, [0.0] * 12)
    with pytest.raises(ValueError, match="control images"):
        quantize_openvino(fp32, images[:8], None, min_agreement=0.99)


def test_min_agreement_options_are_checked(tmp_path: Path, capsys) -> None:
    source = _atto_checkpoint(tmp_path / "model.pt")
    base = ["export", "--checkpoint", str(source), "--calib", str(tmp_path), "-o", str(tmp_path / "m.xml")]
    assert main([*base, "--format", "openvino", "--precision", "int8", "--min-agreement", "120"]) == 2
    assert "percentage between 50 and 100" in capsys.readouterr().err
    assert main([*base[:-2], "-o", str(tmp_path / "m.onnx"), "--format", "onnx", "--min-agreement", "99"]) == 2
    assert "OpenVINO int8 exports only" in capsys.readouterr().err
