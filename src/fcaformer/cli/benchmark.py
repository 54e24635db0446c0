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
                        help="FcaFormer models also timed in ONNX Runtime (default fcaformer_l1)")
    parser.add_argument("--output", "-o", help="write <output>.md, <output>.json and <output>.png")
    parser.add_argument("--replot", metavar="JSON",
                        help="measure nothing: rewrite the table and chart from a JSON this command wrote")
    parser.set_defaults(func=run)


def _caption(info: dict) -> str:
    machine, size = info["machine"], info["img_size"]
    allocator = "glibc tuned (no trimming)" if info.get("cpu_allocator_tuned") else "default allocator"
    return (f"{machine['cpu']}, {machine['torch_threads']} torch threads, fp32, {size}x{size}, {allocator}; "
            f"load average {info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f}")


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..benchmark import ModelRow, latency_vs_macs_plot, markdown_table, run_zoo
    from ..io import atomic_json_dump, atomic_write

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
        rows, info = run_zoo(args.models, args.peers, args.img_size, args.repeats, args.warmup,
                             args.throughput_batch, args.throughput_repeats, args.onnx)
        info["cpu_allocator_tuned"] = getattr(args, "allocator_tuned", False)
    caption = _caption(info)
    names = [r.name for r in rows]
    table = markdown_table(rows, baseline="fcaformer_l1 (faithful)" if "fcaformer_l1 (faithful)" in names else None)
    print(table + "\n\n" + caption)
    if args.output:
        out = Path(args.output)
        atomic_write(out.with_suffix(".md"), lambda h: h.write(table + "\n\n" + caption + "\n"), binary=False)
        if not args.replot:
            atomic_json_dump({"info": info, "rows": [r.to_dict() for r in rows]}, out.with_suffix(".json"))
        latency_vs_macs_plot(rows, out.with_suffix(".png"), caption)
        print(f"wrote {out.with_suffix('.md')}, .png" + ("" if args.replot else " and .json"))
    return 0
