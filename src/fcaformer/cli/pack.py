"""``fcaformer pack``: an ImageFolder dataset as one file of re-encoded images, for ``data.dataset=packed``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pack", help="pack an ImageFolder dataset into one .npz file (to move it, or to train from it)",
        description="Resize every image of ROOT/train and ROOT/val (shorter side to --size, centre crop), re-encode "
                    "it and write both splits, labels and class names into one .npz file. Train from it with "
                    "fcaformer train --data OUT.npz (add --set data.on_device=true to keep it on the GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="ImageFolder root with train/ and val/ (and optionally classes.json)")
    parser.add_argument("out", help="output file (.npz)")
    parser.add_argument("--size", type=int, default=144, help="side of the stored square images")
    parser.add_argument("--quality", type=int, default=75, help="encoder quality (1-100)")
    parser.add_argument("--format", choices=["webp", "jpeg", "png"], default="webp", help="image encoding")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="sub-folders to pack")
    parser.add_argument("--per-class", type=int, help="keep at most N images per class and split (fixed subset)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.data import DataError
    from ..train.device_data import pack_image_folder, read_pack_meta

    if args.size < 32 or not 1 <= args.quality <= 100:
        print(f"error: --size must be >= 32 and --quality in 1..100 (got {args.size}, {args.quality})",
              file=sys.stderr)
        return 2
    if Path(args.out).suffix != ".npz":
        print(f"error: the output must be a .npz file, got {args.out}", file=sys.stderr)
        return 2
    try:
        path = pack_image_folder(args.root, args.out, args.size, args.quality, args.format.upper(), args.splits,
                                 args.per_class)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = read_pack_meta(path)
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items())
    print(f"packed {counts} images of {len(meta['class_names'])} classes at {args.size} px "
          f"({args.format} q{args.quality}) into {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
