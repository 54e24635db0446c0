"""Argument helpers shared by ``fcaformer detect`` and ``fcaformer segment``: options, help with defaults,
one-line user errors, and the reports the actions print."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..files import atomic_json_dump

DEBUG_ENV = "FCAFORMER_DEBUG"
"""Environment variable that, set to 1, makes ``detect`` / ``segment`` show the traceback of an error."""

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError, ValueError)
"""Exceptions reported as one ``error:`` line with exit status 2 (bad paths, data, checkpoints, options;
``CheckpointError``, ``AnnotationError``, ``DataCheckError`` and ``SampleError`` are ``ValueError``\\ s)."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse help that ends each option's text with its default, when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings and not action.required
                and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS):
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


def add_command(subparsers: argparse._SubParsersAction, name: str, help: str,
                description: str) -> argparse._SubParsersAction:
    """The ``detect`` / ``segment`` command; returns its (required) actions to :func:`add_action` to."""
    parser = subparsers.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


def train_description(data: str, damaged: str, size_option: str, guide: str) -> str:
    """The ``--help`` description of a ``train`` action: the data checks and what CPU users must set."""
    return (f"Train on {data}. Damaged {damaged} are skipped, named and counted; too little usable data stops the "
            "run before training. The defaults are the paper's GPU settings: on a CPU set a small --model and "
            f"{size_option} ({guide}, 'On a CPU').")


def add_action(actions: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A ``detect`` / ``segment`` action parser with defaults in its help and a ``--debug`` flag."""
    parser = actions.add_parser(name, help=help, description=kwargs.pop("description", help),
                                formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full traceback instead of one line (or set {DEBUG_ENV}=1)")
    return parser


def guarded(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run an action with INFO logging; a user error prints one ``error: ...`` line and returns 2, a diverged
    training run returns 3 (as ``fcaformer train``). ``--debug`` or ``FCAFORMER_DEBUG=1`` re-raises instead."""
    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return action(args)
        except (*USER_ERRORS, FloatingPointError) as error:
            if debug:
                raise
            if isinstance(error, FloatingPointError):
                print(f"error: training diverged: {error}", file=sys.stderr)
                return 3
            # one line even for multi-line messages (e.g. state-dict mismatches)
            print(f"error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
            return 2

    return run


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


def resume_mode(text: str) -> str:
    """argparse type of ``--resume``'s optional value: only ``auto``."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")
    return text


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from error
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def add_min_usable(parser: argparse.ArgumentParser) -> None:
    """``--min-usable``: how much of a dataset must survive the data checks."""
    parser.add_argument("--min-usable", type=fraction, default=0.5, metavar="FRACTION",
                        help="damaged files are skipped, named and counted; stop with an error when less than "
                             "this fraction of the images (detection: also of the annotations) is usable, checked "
                             "before the run and again as files fail to load during it")


def add_common_train_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Backbone, optimisation, checkpointing and runtime options of both ``train`` actions."""
    parser.add_argument("--out", required=True,
                        help="output folder (checkpoints/state-*.pt, model.pt, train_log.json, curves.png)")
    parser.add_argument("--model", default="fcaformer_l2",
                        choices=("fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"),
                        help="backbone (on a CPU start with fcaformer_l1)")
    parser.add_argument("--backbone-weights",
                        help="release classification / mmdet / mmseg checkpoint, or a project checkpoint "
                             "(default: none, the backbone starts from random weights)")
    parser.add_argument("--backbone-kwargs", type=json_dict, default={},
                        help='JSON architecture overrides, e.g. \'{"drop_path_rate": 0.2}\'')
    parser.add_argument("--iterations", type=int, default=1000, help="total optimizer steps of the run")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per step and process")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--layer-decay", type=float, default=0.95, help="layer-wise lr decay of the backbone")
    parser.add_argument("--warmup-iters", type=int, default=None,
                        help="linear warm-up steps; must be below --iterations (default: min(50, iterations / 10))")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (default: off)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="iterations between training states (checkpoints/state-<iteration>.pt) and saves of "
                             "train_log.json and curves.png")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0,
                        help="also write a training state when this many minutes have passed since the last one "
                             "(0: off)")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="training states kept, the newest (a corrupt newest one falls back to the one before)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also validate every N iterations (0: only after the last one; needs a validation set)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=resume_mode, metavar="auto",
                        help="continue the run in --out from its newest good training state (an error when there "
                             "is none); '--resume auto': continue it if it has one, else start it (the same "
                             "command for the first start and every restart, e.g. under torchrun --max-restarts)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes (0: load in the main one)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    add_min_usable(parser)


def common_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~fcaformer.detection.training.DenseTrainConfig` fields (shared by detection and segmentation)
    from the options of :func:`add_common_train_args`."""
    return dict(
        out_dir=args.out, variant=args.model, backbone_kwargs=args.backbone_kwargs,
        backbone_weights=args.backbone_weights, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, layer_decay=args.layer_decay, warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
        resume=args.resume, workers=args.workers, seed=args.seed, device=args.device, min_usable=args.min_usable,
    )


def _skip_summary(skipped: Mapping[str, Any]) -> str:
    scanned = {reason: len(cases) for reason, cases in skipped.get("when_scanned", {}).items()}
    parts = [f"{n} {reason}" for reason, n in scanned.items()]
    if skipped.get("when_loaded"):
        parts.append(f"{len(skipped['when_loaded'])} samples that failed to load")
    return ", ".join(parts)


def report_training(result: Mapping[str, Any]) -> int:
    """Print what the whole run did (across resumes), its data skips, validation metrics and files; exit 0."""
    if int(os.environ.get("RANK", "0")):  # under torchrun only rank 0 reports
        return 0
    losses, start = result["losses"], result.get("start_iteration", 0)
    if losses:
        window = max(1, min(10, len(losses) // 2))
        first = [v for v in losses[:window] if v == v]  # NaN: iterations before histories were kept
        resumed = f" ({len(losses) - start} in this session, resumed at iteration {start})" if start else ""
        trend = (f"loss {sum(first) / len(first):.4f} -> {sum(losses[-window:]) / window:.4f} (means of the first "
                 f"and last {window})" if first else f"final loss {losses[-1]:.4f}")
        print(f"trained {len(losses)} iterations{resumed}: {trend}")
    skipped = _skip_summary(result.get("skipped", {}))
    if skipped:
        print(f"skipped data: {skipped} (named in the log above and in {result['log']})")
    if result.get("metrics"):
        print_metrics("validation", result["metrics"])
    print(f"checkpoint: {result['checkpoint']}; log: {result['log']}; curves: {result['curves']}")
    return 0


def print_metrics(title: str | None, metrics: Mapping[str, Any]) -> None:
    """Scalar metrics as a rich table (lists such as per-class values are left out)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            table.add_row(name, str(value))
        elif isinstance(value, float):
            table.add_row(name, f"{value:.4f}")
    Console().print(table)


def print_per_class(title: str, class_names: Sequence[str], columns: Mapping[str, Sequence[float | None]]) -> None:
    """A rich table with one row a class and one column a per-class metric (``-``: undefined for the class)."""
    table = Table(title=title, caption="-: class in neither the ground truth nor the predictions")
    table.add_column("class")
    for name in columns:
        table.add_column(name, justify="right")
    for i, class_name in enumerate(class_names):
        table.add_row(class_name, *("-" if values[i] is None else f"{values[i]:.4f}" for values in columns.values()))
    Console().print(table)


def eval_summary(what: str, metrics: Mapping[str, Any], dataset: Any) -> str:
    """``"<what> on N images, K skipped (...)"``: what an evaluation covered and what it left out, in one line.
    Skipped are the dataset's images dropped when it was scanned (``dataset.listed``: how many it lists) and those
    that failed to load during the evaluation (``metrics["skipped_when_loaded"]``)."""
    scanned = getattr(dataset, "listed", len(dataset)) - len(dataset)
    loaded = len(metrics.get("skipped_when_loaded", []))
    detail = (f" ({scanned} when the data was scanned, {loaded} that failed to load; named in the log above)"
              if scanned or loaded else "")
    return f"{what} on {metrics['images']} images, {scanned + loaded} skipped{detail}"


def report_metrics(summary: str, metrics: Mapping[str, Any], json_out: str | None) -> int:
    """Print the one-line ``summary`` (see :func:`eval_summary`) and ``metrics`` (and write them to ``json_out``
    when given); the exit status (0) of an ``eval`` action."""
    print(summary)
    print_metrics(None, metrics)
    if json_out:
        atomic_json_dump(dict(metrics), json_out)
    return 0


def report_written(paths: Iterable[Path]) -> int:
    """Print the files a ``predict`` action wrote as a JSON list (for scripts); the exit status (0)."""
    print(json.dumps([str(p) for p in paths]))
    return 0
