"""The ``fcaformer`` command line: one module per subcommand, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import as_missing_extra
from ..fast import tune_cpu_allocator

# Subcommand modules (``fcaformer.cli.<name>``); each defines ``register(subparsers)`` which adds its parser
# and sets ``func(args) -> int``.
SUBCOMMANDS: tuple[str, ...] = ("profile", "analyze", "train", "pack", "convert", "detect", "segment", "export",
                               "benchmark")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fcaformer", description="FcaFormer models: train, evaluate, profile.")
    parser.add_argument(
        "--default-allocator", action="store_true",
        help="keep glibc's default of returning freed memory to the OS after every step; by default fcaformer "
             "keeps it (fewer page faults, faster CPU work; see fcaformer.fast.tune_cpu_allocator)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fcaformer`` and ``python -m fcaformer``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.default_allocator:
        args.allocator_tuned = tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except ImportError as error:  # an optional extra that is not installed: one line naming the pip install
        missing = as_missing_extra(error)
        if missing is None or getattr(args, "debug", False):
            raise
        print(f"error: {missing}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
