"""``fcaformer export``: a model (fast path) to ONNX, TorchScript or a ``torch.export`` program, checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

from ..export import EXPORT_FORMATS, SUFFIXES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX / TorchScript / torch.export (fast path, checked)",
        description="Export the fused fast path of a model; the batch dim is dynamic, the spatial size fixed.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="project checkpoint (fcaformer train), official release checkpoint, "
                                             "safetensors file or timm hub folder (local-dir:PATH)")
    source.add_argument("--model", help="registered model name (fcaformer_l0 ... l4, or any timm model); "
                                        "weights are random unless --weights is given")
    parser.add_argument("--weights", help="state_dict or safetensors file for --model (project or release layout)")
    parser.add_argument("--dense", action="store_true", help="with --model: the windowed dense backbone")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="PX",
                        help="input size: one value (square) or H W (default 224)")
    parser.add_argument("--output", "-o", help="output file (default: <name>.<format suffix> here)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dim instead of dynamic")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch for tracing (default 2)")
    parser.add_argument("--no-fuse", action="store_true", help="export the faithful path (slower graph)")
    parser.add_argument("--no-check", action="store_true", help="skip the round-trip check")
    parser.set_defaults(func=run)


def load_source(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model named by ``--checkpoint`` or ``--model`` (+ ``--weights``) and a short name for it."""
    import timm

    import fcaformer

    from ..checkpoint import CheckpointError, load_state_dict_strict, unwrap_state_dict
    from ..io import read_model_file

    if args.checkpoint:  # load_official also rebuilds project checkpoints, safetensors files and timm hub folders
        return fcaformer.load_official(args.checkpoint), Path(args.checkpoint.removeprefix("local-dir:")).stem
    if args.dense:
        model = fcaformer.create_dense_backbone(args.model)
    elif timm.is_model(args.model):
        model = timm.create_model(args.model, pretrained=False)
    else:
        raise ValueError(f"unknown model {args.model!r}; use one of {list(fcaformer.MODEL_NAMES)} or a timm name")
    if args.weights:
        state = unwrap_state_dict(read_model_file(args.weights))
        try:
            load_state_dict_strict(model, fcaformer.checkpoint_filter_fn(state, model))
        except CheckpointError as error:
            raise CheckpointError(f"{args.weights} does not fit {args.model}: {error}") from error
    else:
        print(f"note: {args.model} has random weights (pass --weights or --checkpoint to export trained ones)",
              file=sys.stderr)
    return model.eval(), args.model + ("_dense" if args.dense else "")


def run(args: argparse.Namespace) -> int:
    from ..export import export_model

    if len(args.img_size) not in (1, 2):
        raise SystemExit(f"--img-size takes one value or two (H W), got {args.img_size}")
    size = (args.img_size[0],) * 2 if len(args.img_size) == 1 else tuple(args.img_size)
    model, name = load_source(args)
    output = Path(args.output or f"{name}_{size[0]}x{size[1]}{SUFFIXES[args.format]}")
    if args.format == "exported-program" and output.suffix != ".pt2":
        raise SystemExit(f"exported programs must be saved as .pt2 (torch.export.load needs it), got {output}")
    print(f"exporting {name} ({'faithful' if args.no_fuse else 'fast'} path) at {size[0]}x{size[1]} to {output} ...",
          file=sys.stderr)
    result = export_model(
        model, output, args.format, img_size=size, batch_size=args.batch_size,
        dynamic_batch=not args.static_batch, fuse=not args.no_fuse, check=not args.no_check, opset=args.opset,
    )
    batch = "dynamic" if result.dynamic_batch else f"fixed {result.input_shape[0]}"
    print(f"wrote {result.path} ({result.format}; batch {batch}, spatial size fixed at {size[0]}x{size[1]})")
    if result.max_relative_error is not None:
        print(f"round-trip check: max relative error vs PyTorch = {result.max_relative_error:.2e}")
        if result.max_relative_error > 1e-4:
            print("error: the exported graph differs from PyTorch by more than 1e-4", file=sys.stderr)
            return 1
    return 0
