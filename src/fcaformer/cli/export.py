"""``fcaformer export``: a model (inference form) to ONNX, OpenVINO, TorchScript or a ``torch.export`` program, in
fp32 / bf16 / int8 (calibrated on real images), checked against PyTorch."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export import EXPORT_FORMATS, SUFFIXES
from ..weights.hub import LOCAL_PREFIX


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX / OpenVINO / TorchScript / torch.export (checked against PyTorch)",
        description="Export the inference form of a model (the lean graph for ONNX and OpenVINO, the fused fast "
                    "path for the PyTorch formats); the batch dim is dynamic, the spatial size fixed. OpenVINO and "
                    "int8 need the deployment extra: pip install 'fcaformer[deploy]'.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="project checkpoint (fcaformer train), official release checkpoint, "
                                             "safetensors file or timm hub folder (local-dir:PATH)")
    source.add_argument("--model", help="registered model name (fcaformer_l0 ... l4, or any timm model); "
                                        "weights are random unless --weights is given")
    parser.add_argument("--weights", help="state_dict or safetensors file for --model (project or release layout)")
    parser.add_argument("--dense", action="store_true", help="with --model: the windowed dense backbone")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="onnx: fp32 or int8 (ONNX Runtime static quantization); openvino: fp32, bf16 (a hint: "
                             "runs where the CPU has bf16) or int8 (NNCF); default fp32")
    parser.add_argument("--calib", metavar="DIR",
                        help="folder of real images (searched recursively): int8 calibration, and the check runs on "
                             "other images from it (relative error, top-1 agreement with PyTorch fp32)")
    parser.add_argument("--calib-images", type=int, default=300, metavar="N",
                        help="images drawn from --calib for calibration, class-balanced at random (default 300)")
    parser.add_argument("--check", metavar="DIR",
                        help="folder of other real images for the check (e.g. the validation split); default: "
                             "images of --calib not used for calibration")
    parser.add_argument("--check-images", type=int, default=100, metavar="N",
                        help="images drawn for the check, class-balanced at random (default 100)")
    parser.add_argument("--min-agreement", type=float, metavar="PERCENT",
                        help="OpenVINO int8: give layers back to fp32, the most sensitive first, until the top-1 "
                             "agreement with fp32 on --control-images other images of --calib is at least this "
                             "(e.g. 99); slower (minutes)")
    parser.add_argument("--control-images", type=int, default=500, metavar="N",
                        help="with --min-agreement: images of --calib for it, apart from calibration and check "
                             "(default 500)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="PX",
                        help="input size: one value (square) or H W (default: the checkpoint's, else 224)")
    parser.add_argument("--output", "-o", help="output file (default here: <model>_<H>x<W>[_<precision>].<suffix>, "
                                               "<model> the checkpoint's name, or its run folder and architecture)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dim instead of dynamic")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch for tracing (default 2)")
    parser.add_argument("--no-fuse", action="store_true", help="export the faithful path (slower graph)")
    parser.add_argument("--no-check", action="store_true", help="skip the round-trip check")
    parser.set_defaults(func=run)


@dataclass
class ExportSource:
    """What ``--checkpoint`` or ``--model`` (+ ``--weights``) names: the model and what is known about it."""

    model: nn.Module
    name: str
    """Default output file name stem: the model's name, after the run folder for a generic ``model.pt``."""
    data_config: dict[str, Any] | None = None
    class_names: list[str] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """Architecture and provenance, stored in the exported file's metadata."""


_GENERIC_STEMS = ("model", "best", "last", "checkpoint", "weights", "model_ema")
LOW_AGREEMENT = 0.99
"""An int8 top-1 agreement with fp32 below this on the check images earns a hint towards ``--min-agreement``."""


def _output_stem(checkpoint: str, model_name: str | None) -> str:
    """``<file stem>`` or, for a generic name like ``runs/cifar10/model.pt``, ``<run folder>_<model name>``."""
    path = Path(checkpoint.removeprefix(LOCAL_PREFIX))
    stem = path.stem if path.suffix else path.name
    if stem.lower() in _GENERIC_STEMS:
        stem = "_".join(part for part in (path.resolve().parent.name, model_name) if part)
    return stem


def load_source(args: argparse.Namespace) -> ExportSource:
    """The model named by ``--checkpoint`` or ``--model`` (+ ``--weights``) and what its source records."""
    from ..models import create_dense_backbone
    from ..models.state_dicts import load_state_dict_strict, resize_grid_parameters
    from ..weights import read_weights

    if args.checkpoint:  # anything the project reads: project, release, hub folder, training state
        record = read_weights(args.checkpoint)
        return ExportSource(record.build(), _output_stem(args.checkpoint, record.model_name), record.data_config,
                            record.class_names, {"model": record.architecture, "source": record.label,
                                                 "source_kind": record.kind, "source_sha256": record.sha256})
    if not args.weights:
        print(f"note: {args.model} has random weights (pass --weights or --checkpoint to export trained ones)",
              file=sys.stderr)
    if args.dense:
        model = create_dense_backbone(args.model)
        if args.weights:
            load_state_dict_strict(model, resize_grid_parameters(read_weights(args.weights).state_dict, model))
        return ExportSource(model.eval(), args.model + "_dense", record={"model": args.model + " (dense backbone)"})
    record = read_weights(args.weights, model_name=args.model) if args.weights else read_weights(args.model)
    return ExportSource(record.build(), args.model, None, record.class_names,
                        {"model": record.architecture, "source": record.label, "source_kind": record.kind})


@dataclass
class RealImages:
    """Preprocessed real images of an export, disjoint: to calibrate on, to control int8 with (``--min-agreement``)
    and to check the export on; ``None`` for what is not asked for."""

    calibration: torch.Tensor | None = None
    control: torch.Tensor | None = None
    check: torch.Tensor | None = None


def _real_images(args: argparse.Namespace, source: ExportSource, size: tuple[int, int]) -> RealImages:
    """Class-balanced random samples of ``--calib`` (the check from ``--check`` when given), preprocessed as the
    model expects. The control images, when asked for, are the calibration sample's continuation."""
    if not args.calib and not args.check:
        return RealImages()
    from ..deploy import calibration_and_check_images, eval_transform, list_images, load_images

    transform = eval_transform(_data_config(source), size)
    load = lambda files: load_images(files, transform) if files else None  # noqa: E731
    if not args.calib:
        return RealImages(check=load(list_images(args.check, limit=args.check_images)))
    control = args.control_images if args.min_agreement is not None else 0
    first, check_files = calibration_and_check_images(args.calib, args.calib_images + control, args.check_images,
                                                      check_root=args.check)
    calibration_files = first[: max(1, round(len(first) * args.calib_images / (args.calib_images + control)))]
    return RealImages(load(calibration_files) if args.precision == "int8" else None,
                      load(first[len(calibration_files):]) if control else None, load(check_files))


def _data_config(source: ExportSource) -> dict[str, Any]:
    return source.data_config or dict(getattr(source.model, "pretrained_cfg", None) or {})


def run(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError, MissingExtraError

    try:
        return _run(args)
    except (CheckpointError, MissingExtraError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..export import check_export_options, export_metadata, export_model

    if args.img_size is not None and len(args.img_size) not in (1, 2):
        raise SystemExit(f"--img-size takes one value or two (H W), got {args.img_size}")
    if args.precision == "int8" and not args.calib:
        raise ValueError("--precision int8 needs --calib DIR: a folder of real images to calibrate on")
    if args.min_agreement is not None and not 50 <= args.min_agreement <= 100:
        raise ValueError(f"--min-agreement is a percentage between 50 and 100, got {args.min_agreement}")
    check_export_options(args.format, args.precision, args.min_agreement)
    source = load_source(args)
    pixels = args.img_size or [int((source.data_config or {}).get("img_size", 224))]
    size = (pixels[0],) * 2 if len(pixels) == 1 else tuple(pixels)
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    output = Path(args.output or f"{source.name}_{size[0]}x{size[1]}{suffix}{SUFFIXES[args.format]}")
    if args.format == "exported-program" and output.suffix != ".pt2":
        raise SystemExit(f"exported programs must be saved as .pt2 (torch.export.load needs it), got {output}")
    images = _real_images(args, source, size)
    metadata = export_metadata(_data_config(source), size, source.class_names, source.record)
    form = "faithful path" if args.no_fuse else "inference form"
    print(f"exporting {source.name} ({form}, {args.precision}) at {size[0]}x{size[1]} to {output} ...",
          file=sys.stderr)
    result = export_model(
        source.model, output, args.format, img_size=size, batch_size=args.batch_size,
        dynamic_batch=not args.static_batch, fuse=not args.no_fuse, check=not args.no_check, opset=args.opset,
        precision=args.precision, calibration=images.calibration, check_images=images.check, metadata=metadata,
        control_images=images.control, min_agreement=None if args.min_agreement is None else args.min_agreement / 100,
    )
    batch = "dynamic" if result.dynamic_batch else f"fixed {result.input_shape[0]}"
    print(f"wrote {result.path} ({result.format} {result.precision}; batch {batch}, spatial size fixed at "
          f"{size[0]}x{size[1]})")
    if result.max_relative_error is not None:
        where = f"random inputs and {result.check_images} real images" if result.check_images else "random inputs"
        print(f"round-trip check on {where}: max relative error vs PyTorch fp32 = {result.max_relative_error:.2e}")
        if result.top1_agreement is not None:
            print(f"top-1 agreement with PyTorch fp32: {result.top1_agreement:.2%} of {result.check_images} images")
            if result.precision == "int8" and args.min_agreement is None and result.top1_agreement < LOW_AGREEMENT:
                print(f"note: below {LOW_AGREEMENT:.0%}; `--format openvino --min-agreement 99.5` gives the most "
                      "sensitive layers back to fp32 until the agreement holds (docs/deployment.md)", file=sys.stderr)
        elif not args.calib:
            print("note: pass --calib DIR (real images) to also check the export on real images", file=sys.stderr)
        if result.precision == "fp32" and result.max_relative_error > 1e-4:
            print("error: the exported graph differs from PyTorch by more than 1e-4", file=sys.stderr)
            return 1
    return 0
