"""``fcaformer benchmark``: the model zoo and timm peers, interleaved, as markdown, JSON and a PNG chart."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..benchmark import TIMM_PEERS


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..models import MODEL_NAMES, PAPER_MODELS

    parser = subparsers.add_parser(
        "benchmark", help="latency / throughput / memory of the zoo (fast path) and timm peers",
        description="All models in one process, interleaved, warm-up first; medians and p90. On a shared CPU "
                    "the absolute numbers move with the load (recorded); ratios are the robust part.",
    )
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=MODEL_NAMES, metavar="NAME",
                        help="FcaFormer models (default: the paper's L0-L4; also fcaformer_atto, fcaformer_femto)")
    parser.add_argument("--peers", nargs="*", default=list(TIMM_PEERS), metavar="TIMM_NAME",
                        help="timm models to compare with (pretrained=False); none: --peers")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20, help="batch-1 rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--throughput-batch", type=int, default=32)
    parser.add_argument("--throughput-repeats", type=int, default=3, help="0 skips the throughput pass")
    parser.add_argument("--onnx", nargs="*", default=["fcaformer_l1"], metavar="NAME",
                        help="with --runtime torch: FcaFormer models also timed in ONNX Runtime (default fcaformer_l1)")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="run every model (ours and the peers) under this runtime (default torch; openvino needs "
                             "pip install 'fcaformer[deploy]')")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="torch: fp32/bf16 (autocast); onnxruntime: fp32/int8; openvino: fp32/bf16/int8")
    parser.add_argument("--calib", metavar="DIR",
                        help="real images to calibrate int8 on (default for int8: random noise, fine for latency only)")
    parser.add_argument("--calib-images", type=int, default=32, metavar="N", help="calibration images (default 32)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each model per op type (batch 1) and report the layout share")
    parser.add_argument("--output", "-o", help="write <output>.md, <output>.json and <output>.png")
    parser.add_argument("--replot", metavar="JSON",
                        help="measure nothing: rewrite the table and chart from a JSON this command wrote")
    parser.set_defaults(func=run)


def _caption(info: dict) -> str:
    machine, size = info["machine"], info["img_size"]
    allocator = "glibc tuned (no trimming)" if info.get("cpu_allocator_tuned") else "default allocator"
    runtime = f"{info.get('runtime', 'torch')} {info.get('precision', 'fp32')}"
    return (f"{machine['cpu']}, {machine['torch_threads']} threads, {runtime}, {size}x{size}, {allocator}; "
            f"load average {info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f}")


def _calibration(args: argparse.Namespace):
    """int8 calibration images: ``--calib`` (ImageNet preprocessing at the benchmark size) or random noise."""
    import torch

    if args.precision != "int8":
        return None
    if not args.calib:
        noise = torch.Generator().manual_seed(0)
        return torch.randn(args.calib_images, 3, args.img_size, args.img_size, generator=noise)
    from ..deploy import eval_transform, list_images, load_images

    size = (args.img_size, args.img_size)
    return load_images(list_images(args.calib, limit=args.calib_images), eval_transform({}, size))


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..benchmark import ModelRow, latency_vs_macs_plot, markdown_table, profile_table, run_zoo
    from ..errors import MissingExtraError
    from ..files import atomic_json_dump, atomic_write

    if args.replot:
        if not args.output:
            raise SystemExit("--replot needs --output: where to write the table and chart")
        try:
            data = json.loads(Path(args.replot).read_text())
            rows, info = [ModelRow.from_dict(r) for r in data["rows"]], data["info"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            message = f"--replot {args.replot}: not a JSON file written by fcaformer benchmark ({error})"
            raise SystemExit(message) from None
    else:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        unknown = [n for n in args.onnx if n not in args.models]
        if unknown:
            raise SystemExit(f"--onnx models must be among --models; not benchmarked: {unknown}")
        torch.set_num_threads(args.threads)
        try:
            rows, info = run_zoo(args.models, args.peers, args.img_size, args.repeats, args.warmup,
                                 args.throughput_batch, args.throughput_repeats, args.onnx, runtime=args.runtime,
                                 precision=args.precision, calibration=_calibration(args), profile=args.profile)
        except (MissingExtraError, FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        info["cpu_allocator_tuned"] = getattr(args, "allocator_tuned", False)
    caption = _caption(info)
    names = [r.name for r in rows]
    table = markdown_table(rows, baseline="fcaformer_l1 (faithful)" if "fcaformer_l1 (faithful)" in names else None)
    profiles = profile_table(rows)
    if any(r.extra.get("profile") for r in rows):
        table += "\n\nPer-op profile, batch 1:\n\n" + profiles
    print(table + "\n\n" + caption)
    if args.output:
        out = Path(args.output)
        atomic_write(out.with_suffix(".md"), lambda h: h.write(table + "\n\n" + caption + "\n"), binary=False)
        if not args.replot:
            atomic_json_dump({"info": info, "rows": [r.to_dict() for r in rows]}, out.with_suffix(".json"))
        latency_vs_macs_plot(rows, out.with_suffix(".png"), caption)
        print(f"wrote {out.with_suffix('.md')}, .png" + ("" if args.replot else " and .json"))
    return 0
