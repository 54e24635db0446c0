"""Reproduce the paper's central claim at small scale: does forward cross attention help?

Trains three variants of ``fcaformer_femto`` (a small registered hybrid, not in the paper) on Imagenette-160
with the ``repro`` preset (same data, recipe and budget), several seeds each, sequentially:

- ``fca_release``: cross attention on, LSF in the release's place (before the cross-token LayerNorm);
- ``fca_post_norm``: cross attention on, LSF after the cross-token LayerNorm;
- ``no_cross``: the identical network with cross attention off (the paper's baseline).

Each run writes its own folder (``--runs``); finished runs are skipped and interrupted ones resumed, so the
script can be restarted at any time. After every run the aggregate (``<out>/results.json``, ``results.md``)
and the figure (``docs/reproduction.png``) are rewritten, and the first finished seed of each variant is copied
to ``<out>/checkpoints/<variant>.pt`` (a :func:`fcaformer.weights.load_model` checkpoint with class names).

    nohup nice -n 5 python benchmarks/reproduce_cross_attention.py > runs/repro.log 2>&1 &
    python benchmarks/reproduce_cross_attention.py --seeds 0 --set run.epochs=1 data.train_per_class=4 \
        data.val_per_class=4 --runs /tmp/repro-smoke --out /tmp/repro-smoke/out --figure /tmp/repro-smoke/f.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "fca_release": {"cross_attention": True, "lsf": "release"},
    "fca_post_norm": {"cross_attention": True, "lsf": "post_norm"},
    "no_cross": {"cross_attention": False},
}


def run_one(variant: str, seed: int, runs: Path, overrides: list[str], data_root: str) -> dict[str, Any]:
    """Train (or resume, or skip) one variant/seed; returns its results.json content."""
    from fcaformer.train import load_config, train_or_resume

    out = runs / f"{variant}-s{seed}"
    arch = [f"model.kwargs.{k}={json.dumps(v)}" for k, v in VARIANTS[variant].items()]
    print(f"=== {variant} seed {seed} -> {out}", flush=True)
    return train_or_resume(load_config("repro", [f"data.root={data_root}", f"run.seed={seed}", f"run.output={out}",
                                                 "run.progress=false", *arch, *overrides]))


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: the model and its seeds' results (:func:`~fcaformer.train.metrics.summarise_seeds`)."""
    from fcaformer.models.names import describe_model
    from fcaformer.train.metrics import summarise_seeds

    return {
        # runs from before the small variants were registered record fcaformer_l1 with femto's sizes
        variant: {"model": runs[0].get("model") or describe_model(runs[0]["model_name"], runs[0]["model_kwargs"]),
                  **summarise_seeds(runs)}
        for variant, runs in results.items() if runs
    }


def write_outputs(table: dict[str, Any], out: Path, figure: Path) -> None:
    from fcaformer.files import atomic_report, pyplot, save_figure

    plt = pyplot()

    lines = ["| variant | model | seeds | top-1 mean ± std (%) | per seed | top-5 (%) | params | MACs | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        per_seed = ", ".join(f"{v:.2f}" for v in row["top1"])
        lines.append(f"| {name} | {row['model']} | {len(row['seeds'])} | "
                     f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f} | {per_seed} | {row['top5_mean']:.2f} | "
                     f"{row['params'] / 1e6:.3f} M | {row['macs'] / 1e6:.1f} M | {row['epoch_time_s']:.0f} |")
    atomic_report(table, "\n".join(lines) + "\n", out / "results")

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, row) in enumerate(table.items()):
        ax.bar(i, row["top1_mean"], yerr=row["top1_std"], capsize=6, alpha=0.6, color=f"C{i}")
        ax.scatter([i] * len(row["top1"]), row["top1"], color="black", zorder=3, s=14)
        for seed in row["seeds"]:  # training-loss curves from the copied per-run metrics
            path = out / "runs" / f"{name}-s{seed}.metrics.jsonl"
            if path.exists():
                history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                ax_loss.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], color=f"C{i}",
                             alpha=0.7, label=name if seed == row["seeds"][0] else None)
    ax.set_xticks(range(len(table)), list(table))
    low = min(min(r["top1"]) for r in table.values())
    high = max(max(r["top1"]) for r in table.values())
    ax.set_ylim(max(0, low - 5), min(100, high + 3))
    ax.set_ylabel("Imagenette val top-1 (%)")
    ax.set_title("val top-1: mean ± std over seeds (dots = seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax_loss.set(xlabel="epoch", ylabel="train loss (label-smoothed CE)", title="training loss, every seed")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    save_figure(fig, figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenette-160"))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "repro", help="one folder per run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "repro", help="aggregate + checkpoints")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "reproduction.png")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    from fcaformer.files import atomic_write

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for seed in args.seeds:  # seed-major: every variant gets its first seed (and checkpoint) early
        for variant in args.variants:
            result = run_one(variant, seed, args.runs, args.set, args.data)
            result["seed"] = seed
            results[variant].append(result)
            run_dir = args.runs / f"{variant}-s{seed}"
            atomic_write(args.out / "runs" / f"{variant}-s{seed}.json",
                         lambda h, r=result: json.dump({k: v for k, v in r.items() if k != "skipped_list"}, h,
                                                       indent=2), binary=False)
            if (run_dir / "metrics.jsonl").exists():
                text = (run_dir / "metrics.jsonl").read_text()
                atomic_write(args.out / "runs" / f"{variant}-s{seed}.metrics.jsonl", lambda h, t=text: h.write(t),
                             binary=False)
            checkpoint = args.out / "checkpoints" / f"{variant}.pt"
            if not checkpoint.exists() and (run_dir / "model.pt").exists():
                data = (run_dir / "model.pt").read_bytes()
                atomic_write(checkpoint, lambda h, d=data: h.write(d))
            write_outputs(aggregate(results), args.out, args.figure)
            top1 = result["val"]["top1"]
            print(f"--- {variant} seed {seed}: top-1 {top1:.2f}% ({result['mean_epoch_time_s']:.0f} s/epoch)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
