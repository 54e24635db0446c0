"""int8 calibration on a user's own data: the class-balanced random sample ``fcaformer export`` draws now, against
the path-sorted split it used before (issue 24), on a set shaped like the user's and on Imagenette.

- **A user's set**: 200 train and 100 val images of each Imagenette class, downscaled to 32 px JPEGs (quality
  90) in an ImageFolder: 2,000 / 1,000 images of 10 classes, the shape of the set the issue reports. The shipped
  L1 (``docs/repro_gpu/checkpoints/fca_release.safetensors``, Imagenette at 128 px) is fine-tuned on it at 64 px
  with the documented recipe (``fcaformer train --pretrained``), ``--epochs`` epochs.
- **Imagenette**: the shipped L1 itself, 128 px, all 3,925 val images.

For each model, OpenVINO int8 and ONNX Runtime int8 (NNCF, as ``fcaformer export``), calibrated on
``--calib-images`` training images chosen

- ``path-sorted`` (before): a random sample of calibration + check files, sorted by path, its first
  ``--calib-images`` (which come from the first classes only);
- ``balanced`` (now): :func:`fcaformer.deploy.calibration_and_check_images`;
- ``balanced, min agreement P %`` (OpenVINO): the same calibration images, then NNCF's accuracy control gives
  layers back to fp32 until ``--min-agreement`` P % of ``--control-images`` other training images agree with fp32
  (``fcaformer export --min-agreement P``);

then top-1 agreement with PyTorch fp32 and top-1 on every held-out val image (never used for calibration or
control). Writes ``docs/int8_calibration.{json,md}``.

    nohup nice -n 5 python benchmarks/int8_calibration.py > runs/int8.log 2>&1 &
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from fcaformer.benchmark import machine_info
from fcaformer.deploy import (
    OpenVinoRunner,
    build_runner,
    calibration_and_check_images,
    eval_transform,
    inference_graph,
    load_images,
    to_openvino,
)
from fcaformer.files import atomic_report, file_sha256, relative_path
from fcaformer.images import expand_image_inputs
from fcaformer.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette-160"
CHECKPOINT = ROOT / "docs" / "repro_gpu" / "checkpoints" / "fca_release.safetensors"
RUNTIMES = ("openvino", "onnxruntime")


def make_user_set(out: Path, train_per_class: int, val_per_class: int, size: int = 32) -> Path:
    """The user-like set (written once): the first images of each Imagenette class, ``size`` px JPEGs."""
    if (out / "val").is_dir():
        return out
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for folder in sorted((IMAGENETTE / split).iterdir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:count]:
                with Image.open(path) as image:
                    image.convert("RGB").resize((size, size), Image.BICUBIC).save(target / path.name, quality=90)
    return out


def fine_tune(data: Path, out: Path, epochs: int, img_size: int) -> Path:
    """``fcaformer train --pretrained`` of the shipped L1 on ``data`` (skipped when the run has finished)."""
    if not (out / "results.json").exists():
        command = [sys.executable, "-m", "fcaformer", "train", "--data", str(data), "--model", "fcaformer_l1",
                   "--pretrained", str(CHECKPOINT), "--img-size", str(img_size), "--epochs", str(epochs),
                   "--output", str(out), "--no-progress"]
        subprocess.run(command, check=True)
    return out / "model.pt"


def path_sorted_calibration(root: Path, calibration: int, check: int, seed: int = 0) -> list[Path]:
    """What ``fcaformer export`` calibrated on before: ``calibration + check`` files drawn at random, sorted by
    path, the first ``calibration`` of them."""
    files = sorted(expand_image_inputs([root], recursive=True))
    if len(files) > calibration + check:
        chosen = np.random.default_rng(seed).choice(len(files), size=calibration + check, replace=False)
        files = [files[i] for i in sorted(chosen)]
    return files[:calibration]


def measure(checkpoint: Path, train: Path, val: Path, calib_images: int, check_images: int,
            threads: int, control_images: int, min_agreement: float) -> list[dict[str, Any]]:
    """Agreement with PyTorch fp32 and top-1 on every ``val`` image, per calibration method and runtime."""
    model, raw = load_model(checkpoint)
    data_config = raw["data_config"]
    size = (int(data_config["img_size"]),) * 2
    transform = eval_transform(data_config, size)
    samples = {"path-sorted": path_sorted_calibration(train, calib_images, check_images),
               "balanced": calibration_and_check_images(train, calib_images, check_images)[0]}
    runners = {}
    for method, files in samples.items():
        calibration = load_images(files, transform)
        for runtime in RUNTIMES:
            runners[(method, runtime)] = build_runner(model, runtime, "int8", size, threads, calibration)
    controlled = f"balanced, min agreement {min_agreement:g} %"
    first, _ = calibration_and_check_images(train, calib_images + control_images, 0)
    samples[controlled] = first[:calib_images]
    graph = to_openvino(inference_graph(model, "openvino", size), size, "int8", load_images(first[:calib_images],
                        transform), control=load_images(first[calib_images:], transform),
                        min_agreement=min_agreement / 100)
    runners[(controlled, "openvino")] = OpenVinoRunner(graph, threads, "int8")
    dataset = ImageFolder(str(val), transform)
    targets, reference = [], []
    predictions: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in runners}
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=50):
            targets.append(labels)
            reference.append(model(images).argmax(-1))
            for key, runner in runners.items():
                predictions[key].append(torch.as_tensor(runner(images)).argmax(-1))
    y, fp32 = torch.cat(targets), torch.cat(reference)
    rows = []
    for (method, runtime), preds in predictions.items():
        p = torch.cat(preds)
        rows.append({
            "method": method, "runtime": runtime,
            "calibration_classes": len(Counter(path.parent.name for path in samples[method])),
            "agreement": 100 * (p == fp32).float().mean().item(), "top1": 100 * (p == y).float().mean().item(),
            "fp32_top1": 100 * (fp32 == y).float().mean().item(), "images": len(y),
        })
        print(rows[-1], flush=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [f"Machine: {machine['cpu']}, {results['threads']} threads; torch {machine['torch']}. "
             f"{results['calib_images']} calibration images; {results['control_images']} control images for the "
             "min-agreement row (other training images). Agreement and top-1 on every val image.", "",
             "| set | model | calibration | classes in it | runtime | agreement with fp32 (%) | int8 top-1 (%) | "
             "fp32 top-1 (%) | val images |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for name, entry in results["sets"].items():
        for row in entry["rows"]:
            lines.append(f"| {name} | {entry['model']} | {row['method']} | {row['calibration_classes']} | "
                         f"{row['runtime']} | {row['agreement']:.2f} | {row['top1']:.2f} | {row['fp32_top1']:.2f} | "
                         f"{row['images']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "int8_calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "int8_calibration")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--check-images", type=int, default=100)
    parser.add_argument("--control-images", type=int, default=500)
    parser.add_argument("--min-agreement", type=float, default=99.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-imagenette", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    user = make_user_set(args.work / "user32", 200, 100)
    tuned = fine_tune(user, args.work / "finetune64", args.epochs, 64)
    sets = {"user-like (32 px JPEGs, 10 classes)": {
        "model": "shipped L1 fine-tuned at 64 px", "checkpoint_sha256": file_sha256(tuned),
        "rows": measure(tuned, user / "train", user / "val", args.calib_images, args.check_images, args.threads,
                        args.control_images, args.min_agreement)}}
    if not args.skip_imagenette:
        sets["Imagenette (160 px JPEGs, 10 classes)"] = {
            "model": f"shipped L1 at 128 px ({relative_path(CHECKPOINT, ROOT)})",
            "checkpoint_sha256": file_sha256(CHECKPOINT),
            "rows": measure(CHECKPOINT, IMAGENETTE / "train", IMAGENETTE / "val", args.calib_images,
                            args.check_images, args.threads, args.control_images, args.min_agreement)}
    results = {"machine": machine_info(), "threads": args.threads, "calib_images": args.calib_images,
               "control_images": args.control_images, "epochs": args.epochs, "sets": sets}
    atomic_report(results, markdown(results), args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
