"""``fcaformer convert``: any checkpoint the project reads as a timm hub folder, with its parity measured."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="write a checkpoint as a timm hub folder (config.json + model.safetensors + model card)",
        description="Convert SOURCE (a release classification checkpoint, a project checkpoint or training state, "
                    "a timm hub folder, or a bare state dict with --model) into OUT_DIR, a folder that "
                    "timm.create_model('local-dir:OUT_DIR', pretrained=True) loads after 'import fcaformer' (and "
                    "that uploads to the Hugging Face Hub as it is). The folder is loaded back through timm and "
                    "its logits compared with the source's before it is published; the model card records the "
                    "params, MACs, the source's sha256 and that difference.",
    )
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--model", help="registered model name, for a bare state dict that does not say what it holds")
    parser.add_argument("--img-size", type=int,
                        help="with --model: the training size of the state dict's grid-sized parameters")
    parser.add_argument("--use-ema", action="store_true", help="release checkpoints: take model_ema if present")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError
    from ..weights import convert_to_hub

    if args.img_size is not None and not args.model:
        print("error: --img-size only applies with --model (other sources record their size)", file=sys.stderr)
        return 2
    try:
        report = convert_to_hub(args.source, args.out_dir, model_name=args.model,
                                model_kwargs={"img_size": args.img_size} if args.img_size else None,
                                use_ema=args.use_ema, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"wrote {report.out_dir}: {report.architecture} ({report.params / 1e6:.2f} M params, "
          f"{report.macs / 1e9:.4f} GMACs at {report.img_size}px) from {report.source} ({report.source_kind}); "
          f"parity through timm: max abs diff {report.max_abs_diff:.3g}, relative {report.relative_diff:.3g}")
    print(f"load it with: import fcaformer, timm; timm.create_model('local-dir:{report.out_dir}', pretrained=True)")
    return 0
