"""Argument helpers shared by ``fcaformer detect`` and ``fcaformer segment``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..io import atomic_json_dump


def json_dict(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (lists become tuples, as model constructors expect)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"dims\": [32, 64, 96, 128]}}', "
                                         f"got {text!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def add_common_train_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Backbone, optimisation, checkpointing and runtime options of both ``train`` actions."""
    parser.add_argument("--out", required=True, help="output folder (last.pt, model.pt, train_log.json)")
    parser.add_argument("--model", default="fcaformer_l2",
                        choices=("fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"))
    parser.add_argument("--backbone-weights",
                        help="release classification / mmdet / mmseg checkpoint, or a project checkpoint")
    parser.add_argument("--backbone-kwargs", type=json_dict, default={},
                        help='JSON architecture overrides, e.g. \'{"drop_path_rate": 0.2}\'')
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.95, help="layer-wise lr decay of the backbone")
    parser.add_argument("--warmup-iters", type=int, default=50)
    parser.add_argument("--clip-grad", type=float, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=100, help="iterations between last.pt saves")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when it exists")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def common_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~fcaformer.detection.training.DenseTrainConfig` fields (shared by detection and segmentation)
    from the options of :func:`add_common_train_args`."""
    return dict(
        out_dir=args.out, variant=args.model, backbone_kwargs=args.backbone_kwargs,
        backbone_weights=args.backbone_weights, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, layer_decay=args.layer_decay, warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad, checkpoint_every=args.checkpoint_every, resume=args.resume, workers=args.workers,
        seed=args.seed, device=args.device,
    )


def report_training(result: Mapping[str, Any]) -> int:
    """Print the loss trend, validation metrics and checkpoint of a training run; the exit status (0)."""
    if int(os.environ.get("RANK", "0")):  # under torchrun only rank 0 reports
        return 0
    losses = result["losses"]
    if losses:
        print(f"trained {len(losses)} iterations: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if result.get("metrics"):
        print_metrics("validation", result["metrics"])
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def print_metrics(title: str, metrics: Mapping[str, Any]) -> None:
    """Scalar metrics as a rich table (lists such as per-class IoU are left out)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            table.add_row(name, f"{value:.4f}")
    Console().print(table)


def report_metrics(title: str, metrics: Mapping[str, Any], json_out: str | None) -> int:
    """Print ``metrics`` (and write them to ``json_out`` when given); the exit status (0) of an ``eval`` action."""
    print_metrics(title, metrics)
    if json_out:
        atomic_json_dump(metrics, json_out)
    return 0


def report_written(paths: Iterable[Path]) -> int:
    """Print the files a ``predict`` action wrote as a JSON list (for scripts); the exit status (0)."""
    print(json.dumps([str(p) for p in paths]))
    return 0
