"""``fcaformer analyze``: what forward cross attention does in one or more models, on a set of images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console


def _query(text: str) -> tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"query must be 'y,x' relative to the image, e.g. 0.5,0.5; got {text!r}"
        ) from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(f"query coordinates must be in [0, 1], got {text!r}")
    return y, x


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="attention share on cross tokens, LSF/bias statistics and attention maps of trained models",
        description=(
            "Measure what forward cross attention does: per block and head, the share of attention mass on "
            "regular tokens and on each earlier block's cross tokens; LSF and cross-token-bias statistics "
            "and how much the LSFs change each block's output; outputs with the cross tokens masked out; "
            "attention maps over the image. Writes JSON, a "
            "markdown summary and PNG figures per model (and a comparison when several models are given)."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="project checkpoint (.pt), release checkpoint, or model name (random weights)")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files and/or folders (class-per-folder datasets: sampled over classes)")
    parser.add_argument("--num-images", type=int, default=100, help="images to use (default 100)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: the checkpoint's training resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window-size", type=int, nargs=2, default=None, metavar=("S3", "S4"),
                        help="run the hybrid in windowed mode, e.g. 14 7")
    parser.add_argument("--queries", type=_query, nargs="+", default=None, metavar="Y,X",
                        help="relative query positions of the attention maps (default 0.5,0.5 0.2,0.2)")
    parser.add_argument("--map-images", type=int, nargs="*", default=[0, 1], metavar="I",
                        help="indices of the images whose attention maps are drawn (default 0 1)")
    parser.add_argument("--map-blocks", nargs="+", default=None, metavar="BLOCK",
                        help="blocks to draw maps for, e.g. stages.2.blocks.3 (default: every block with cross tokens)")
    parser.add_argument("--fast", action="store_true",
                        help="analyse the fused fast-inference form (fcaformer.fast.fuse_model) of each model")
    parser.add_argument("--no-lsf-effect", action="store_true",
                        help="skip measuring the LSFs' effect (saves about three forward passes)")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the runs with cross tokens masked out / attention removed (saves three passes)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        return _run(args, console)
    except (FileNotFoundError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, console: Console) -> int:
    from ..analysis import DEFAULT_QUERIES, analyze, collect_images, load_analysis_model
    from ..analysis.plots import plot_share_by_depth

    images = collect_images(args.images, args.num_images)
    overrides = {"window_size": tuple(args.window_size)} if args.window_size else {}
    names = [Path(m).stem if Path(m).exists() else m for m in args.models]
    if len(set(names)) != len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    results = {}
    for name, source in zip(names, args.models, strict=True):
        loaded = load_analysis_model(source, **overrides)
        if args.fast:
            from ..fast import fuse_model

            loaded.model = fuse_model(loaded.model, inplace=True)
            loaded.details["fused"] = True
        console.print(f"[bold]{source}[/]: {type(loaded.model).__name__} ({loaded.kind}), "
                      f"{len(images)} images at {args.img_size or loaded.img_size}")
        result = analyze(
            loaded,
            images,
            img_size=args.img_size,
            batch_size=args.batch_size,
            map_images=[i for i in args.map_images if i < len(images)],
            map_queries=args.queries or DEFAULT_QUERIES,
            map_blocks=args.map_blocks,
            measure_lsf=not args.no_lsf_effect,
            measure_ablation=not args.no_ablation,
        )
        out_dir = args.out / name if len(args.models) > 1 else args.out
        files = result.save(out_dir, name="analysis")
        results[name] = result
        if result.cross_ablation:
            ablation = result.cross_ablation
            console.print(f"  without cross tokens: output change {ablation['output_change']:.3f}"
                          + (f", top-1 {ablation['top1']:.3f} -> {ablation['top1_masked']:.3f}"
                             if "top1" in ablation else ""))
        for block in result.cross_blocks():
            att = block["attention"]
            console.print(f"  {block['label']}: cross share {att['cross_share']:.3f} "
                          f"± {att['cross_share_std_over_images']:.3f}")
        console.print(f"  wrote {len(files)} files to {out_dir}")
    if len(results) > 1:
        path = plot_share_by_depth({n: r.blocks for n, r in results.items()},
                                   args.out / "compare_share_by_depth.png")
        console.print(f"comparison: {path}")
    return 0
