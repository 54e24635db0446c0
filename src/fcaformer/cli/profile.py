"""``fcaformer profile``: params and MACs of every variant, next to the published numbers."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ..models import MODEL_NAMES, PAPER_MODELS
from ..profile import profile_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="params and MACs of the model zoo")
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=MODEL_NAMES, metavar="NAME",
                        help="models to profile (default: the paper's L0-L4, which have published numbers; also "
                             "fcaformer_atto, fcaformer_femto)")
    parser.add_argument("--img-size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    from .. import models  # noqa: F401  (registers the models with timm)

    profiles = [profile_model(name, args.img_size) for name in args.models]
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
        return 0
    table = Table(title=f"FcaFormer zoo at {args.img_size}x{args.img_size} (batch 1, MACs = FLOPs / 2)")
    for column in ("model", "params (M)", "ref (M)", "diff", "GMACs", "ref GMACs", "diff"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for p in profiles:
        table.add_row(
            p.name,
            f"{p.params_m:.3f}",
            _fmt(p.ref_params_m, ".2f"),
            _fmt(p.params_diff_pct, "+.2f") + ("%" if p.params_diff_pct is not None else ""),
            f"{p.gmacs:.3f}",
            _fmt(p.ref_gmacs if args.img_size == 224 else None, ".3f"),
            _fmt(p.gmacs_diff_pct, "+.2f") + ("%" if p.gmacs_diff_pct is not None else ""),
        )
    Console().print(table)
    print("references: SPEC section 1 (the authors' release, torch.utils.flop_counter); L0: paper (5.9 M)")
    return 0
