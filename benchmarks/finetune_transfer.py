"""Does fine-tuning from pretrained weights work? Transfer between two halves of Imagenette.

1. Pretrain ``fcaformer_femto`` (a small registered hybrid, not in the paper) on five Imagenette classes (tench,
   English springer, cassette player, chain saw, church: all their training images) and save it as
   ``<out>/femto_imagenette5.safetensors`` (fp16, a project checkpoint).
2. On the other five classes (French horn, garbage truck, gas pump, golf ball, parachute) with only 20 training
   images per class, train the same model three ways under the same budget, several seeds each:

   - ``finetune``: from the pretrained weights (``--pretrained``; new classifier, layer-wise lr decay);
   - ``linear_probe``: from the pretrained weights with the backbone frozen (``--freeze-backbone``);
   - ``scratch``: from a random initialisation.

   Each is evaluated on all validation images of those five classes.

Two studies: ``same_lr`` trains every arm at the preset's lr (:data:`PRESET_SETTINGS`); ``selected``
(``--select-lr``) first picks each arm's setting from :data:`GRID` (the lr; for fine-tuning also the layer-wise lr
decay) on a development split (the same 20 training images per class, scored on 100 *other training* images per
class, seed 0; the val images stay unseen), then runs the arms at those settings. The comparison of fine-tuning
with scratch reports the margin, its size in pooled standard deviations, the gap between the worst fine-tuning and
the best scratch seed, and Welch's t-test.

Every run writes its own folder under ``--runs``; finished runs are skipped and interrupted ones resumed, so the
script can be restarted at any time. After every run the aggregate (``<out>/results.json``, ``results.md``) and
the figure are rewritten.

    nohup nice -n 5 python benchmarks/finetune_transfer.py --select-lr > runs/finetune.log 2>&1 &
    # smoke version (seconds)
    python benchmarks/finetune_transfer.py --quick --select-lr --seeds 0 --runs /tmp/ft --out /tmp/ft/out \
        --figure /tmp/ft/f.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CLASSES = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079"]
TRANSFER_CLASSES = ["n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
CHECKPOINT_NAME = "femto_imagenette5.safetensors"

# The repro preset (fcaformer_femto at 96 px, AdamW lr 2e-3 at batch 32, cosine, 1 warm-up epoch, one thread),
# evaluated once at the end with precise BN.
COMMON = ["run.threads=1", "run.progress=false", "run.eval_every=1000", "run.precise_bn_images=null",
          "data.cache=true", "data.verify_images=false"]
PRETRAIN = [f"data.classes={json.dumps(PRETRAIN_CLASSES)}", "data.train_per_class=null", "run.epochs=12",
            "model.drop_path_rate=0.05"]
TRANSFER = [f"data.classes={json.dumps(TRANSFER_CLASSES)}", "data.train_per_class=20", "run.batch_size=20",
            "run.epochs=30"]
ARMS: dict[str, list[str]] = {
    "finetune": ["model.head_init_scale=0.001"],
    "linear_probe": ["model.freeze_backbone=true", "model.head_init_scale=0.001"],
    "scratch": [],
}
QUICK = ["run.epochs=1", "data.train_per_class=8", "data.val_per_class=4", "data.cache=false"]
Setting = dict[str, float | None]
# Each arm's lr (at batch 32, the preset's lr_base_batch) and, for fine-tuning, layer-wise lr decay (None: every
# layer at the head's lr): the preset's values, and the grid tried on a development split (seed 0: the training
# subset against 100 other *training* images per class, so the val images stay untouched until the end).
PRESET_SETTINGS: dict[str, Setting] = {"finetune": {"lr": 2e-3, "layer_decay": 0.75}, "linear_probe": {"lr": 2e-3},
                                       "scratch": {"lr": 2e-3}}
GRID: dict[str, list[Setting]] = {
    "finetune": [{"lr": lr, "layer_decay": decay} for decay in (0.75, None) for lr in (6e-4, 2e-3, 6e-3)],
    "linear_probe": [{"lr": 2e-3}, {"lr": 2e-2}],
    "scratch": [{"lr": lr} for lr in (6e-4, 2e-3, 6e-3)],
}
DEV_PER_CLASS = 100


def train_run(out: Path, overrides: list[str], data_root: str) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run; returns its results.json content."""
    from fcaformer.train import load_config, train_or_resume

    print(f"=== {out.name}", flush=True)
    return train_or_resume(load_config("repro", [f"data.root={data_root}", f"run.output={out}", *COMMON, *overrides]))


def pretrain(runs: Path, out: Path, data_root: str, extra: list[str]) -> tuple[Path, dict[str, Any]]:
    """The five-class model, saved as an fp16 safetensors project checkpoint (what the transfer runs start from)."""
    from benchmarks._commit import commit_checkpoint

    result = train_run(runs / "pretrain", [*PRETRAIN, *extra], data_root)
    checkpoint = out / CHECKPOINT_NAME
    if not checkpoint.exists():
        commit_checkpoint(runs / "pretrain" / "model.pt", checkpoint, REPO)
    return checkpoint, result


def dev_split(data_root: str, runs: Path, extra: list[str]) -> Path:
    """An ImageFolder of symlinks: ``train/`` = the transfer runs' training subset, ``val/`` = up to
    :data:`DEV_PER_CLASS` other training images per class (fixed choice)."""
    import random

    from fcaformer.train import load_config
    from fcaformer.train.datasets import load_image_lists

    root = runs / "dev-data"
    config = load_config("repro", [f"data.root={data_root}", *COMMON, *TRANSFER, *extra, "data.cache=false"])
    chosen, _ = load_image_lists(config.data)
    config.data.train_per_class = None
    everything, _ = load_image_lists(config.data)
    used = {path for path, _ in chosen.samples}
    rest: dict[int, list[str]] = {}
    for path, label in everything.samples:
        if path not in used:
            rest.setdefault(label, []).append(path)
    per_class = 4 if extra else DEV_PER_CLASS
    for split, groups in (("train", {}), ("val", rest)):
        if split == "train":
            for path, label in chosen.samples:
                groups.setdefault(label, []).append(path)
        for label, paths in groups.items():
            folder = root / split / chosen.class_ids[label]
            folder.mkdir(parents=True, exist_ok=True)
            picked = paths if split == "train" else random.Random(label).sample(paths, min(per_class, len(paths)))
            for path in picked:
                link = folder / Path(path).name
                if not link.exists():
                    link.symlink_to(Path(path).resolve())
    return root


def setting_overrides(setting: Setting) -> list[str]:
    return [f"optim.{key}={json.dumps(value)}" for key, value in setting.items()]


def setting_text(setting: Setting) -> str:
    """``lr 0.002, layer decay 0.75`` (tables and figures)."""
    return ", ".join(f"{key.replace('_', ' ')} {'off' if value is None else f'{value:g}'}"
                     for key, value in setting.items())


def setting_label(setting: Setting) -> str:
    """``lr0.002-layer_decay0.75``; ``layer_decay_off`` for None (a run folder's name)."""
    return "-".join(f"{key}_off" if value is None else f"{key}{value:g}" for key, value in setting.items())


def select_settings(runs: Path, out: Path, checkpoint: Path, data_root: str, extra: list[str]) -> dict[str, Any]:
    """The best setting of :data:`GRID` per arm on the development split (seed 0); written to
    ``<out>/lr_selection.json``."""
    dev = dev_split(data_root, runs, extra)
    table: dict[str, Any] = {"dev_val_images_per_class": DEV_PER_CLASS, "arms": {}}
    for arm, settings in GRID.items():
        start = [f"model.pretrained={checkpoint}"] if arm != "scratch" else []
        scores = {}
        for setting in settings:
            label = setting_label(setting)
            result = train_run(runs / f"dev-{arm}-{label}", [*TRANSFER, *ARMS[arm], *start, *setting_overrides(setting),
                                                             "run.seed=0", *extra, "data.classes=null"], str(dev))
            scores[label] = result["val"]["top1"]
            print(f"--- dev {arm} {label}: top-1 {scores[label]:.2f}%", flush=True)
        best = max(settings, key=lambda setting: scores[setting_label(setting)])
        table["arms"][arm] = {"dev_top1": scores, "selected": best}
    from fcaformer.files import atomic_json_dump

    atomic_json_dump(table, out / "lr_selection.json")
    return table


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm of one study: the seeds' results (:func:`~fcaformer.train.metrics.summarise_seeds`), its setting
    and what it started from."""
    from fcaformer.train.metrics import summarise_seeds

    return {**summarise_seeds(runs), "setting": runs[0]["setting"], "pretrained": runs[0].get("pretrained")}


def compare(arms: dict[str, Any]) -> dict[str, float]:
    """Fine-tuning vs scratch: the difference of the means, in points and in pooled standard deviations, the worst
    fine-tuning seed minus the best scratch seed, and Welch's t-test (two-sided)."""
    if "finetune" not in arms or "scratch" not in arms:
        return {}
    ft, sc = arms["finetune"], arms["scratch"]
    margin = ft["top1_mean"] - sc["top1_mean"]
    pooled = ((ft["top1_std"] ** 2 + sc["top1_std"] ** 2) / 2) ** 0.5
    result = {"margin": margin, "margin_in_pooled_std": margin / max(pooled, 1e-9),
              "worst_finetune_minus_best_scratch": min(ft["top1"]) - max(sc["top1"])}
    from fcaformer.train.metrics import welch_test

    welch = welch_test(ft["top1"], sc["top1"])
    if welch is not None:
        result.update(welch_t=welch["t"], welch_p=welch["p"])
    return result


def aggregate(studies: dict[str, dict[str, list[dict[str, Any]]]], pretrain_result: dict[str, Any],
              lr_selection: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the docs show: the pretraining, and per study and arm the seeds' results and the comparison."""
    table: dict[str, Any] = {
        "model": pretrain_result["model"],
        "params": pretrain_result["params"],
        "pretrain": {"classes": PRETRAIN_CLASSES, "train_images": pretrain_result["train_images"],
                     "val_images": pretrain_result["val_images"], "epochs": pretrain_result["epochs_done"],
                     "steps": pretrain_result["steps"], "top1": pretrain_result["val"]["top1"],
                     "epoch_time_s": pretrain_result["mean_epoch_time_s"]},
        "transfer_classes": TRANSFER_CLASSES,
        "studies": {},
        "lr_selection": lr_selection,
        "overrides": {"common": COMMON, "pretrain": PRETRAIN, "transfer": TRANSFER, "arms": ARMS,
                      "preset_settings": PRESET_SETTINGS, "grid": GRID},
    }
    for study, results in studies.items():
        arms = {arm: summarise(runs) for arm, runs in results.items() if runs}
        table["studies"][study] = {"arms": arms, "finetune_vs_scratch": compare(arms)}
    return table


def write_outputs(table: dict[str, Any], out: Path, figure: Path) -> None:
    from fcaformer.files import atomic_report, pyplot, save_figure
    from fcaformer.train.metrics import plot_seed_panel

    plt = pyplot()

    lines = []
    for study, content in table["studies"].items():
        lines += [f"{study}:", "",
                  "| arm | setting (lr at batch 32) | seeds | top-1 mean ± std (%) | per seed | train images | steps "
                  "| s/epoch |", "|---|---|---|---|---|---|---|---|"]
        for name, row in content["arms"].items():
            per_seed = ", ".join(f"{v:.2f}" for v in row["top1"])
            lines.append(f"| {name} | {setting_text(row['setting'])} | {len(row['seeds'])} | {row['top1_mean']:.2f} ± "
                         f"{row['top1_std']:.2f} | {per_seed} | {row['train_images']} | {row['steps']} | "
                         f"{row['epoch_time_s']:.1f} |")
        versus = content["finetune_vs_scratch"]
        if versus:
            welch = f", Welch t {versus['welch_t']:.2f}, p {versus['welch_p']:.2g}" if "welch_p" in versus else ""
            lines += ["", f"fine-tune − scratch: {versus['margin']:+.2f} points ({versus['margin_in_pooled_std']:.1f} "
                      f"pooled std){welch}; worst fine-tune seed − best scratch seed: "
                      f"{versus['worst_finetune_minus_best_scratch']:+.2f} points"]
        lines.append("")
    atomic_report(table, "\n".join(lines), out / "results")

    studies = list(table["studies"].items())
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4), squeeze=False)
    for ax, (study, content) in zip(axes[0], studies):
        arms = {f"{name}\n{setting_text(row['setting'])}": row["top1"] for name, row in content["arms"].items()}
        plot_seed_panel(ax, arms, study, "val top-1 on the 5 new classes (%)", reference=(20, "chance (5 classes)"),
                        ylim=(0, 100), legend_loc="upper right")
    fig.suptitle(f"{table['model']} pretrained on 5 Imagenette classes, then 20 images per class of 5 others",
                 fontsize=10)
    save_figure(fig, figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenette-160"))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "finetune", help="one folder per run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "finetuning",
                        help="aggregate and the pretrained checkpoint")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "finetuning.png")
    parser.add_argument("--select-lr", action="store_true",
                        help="also choose each arm's setting (lr; layer decay for fine-tuning) on a development split "
                        "and run the arms at those settings")
    parser.add_argument("--quick", action="store_true",
                        help="one epoch, 8 training and 4 val images per class (a smoke test)")
    args = parser.parse_args(argv)
    extra = QUICK if args.quick else []

    checkpoint, pretrain_result = pretrain(args.runs, args.out, args.data, extra)
    print(f"--- pretrain: top-1 {pretrain_result['val']['top1']:.2f}% on the 5 pretraining classes", flush=True)
    selection = select_settings(args.runs, args.out, checkpoint, args.data, extra) if args.select_lr else None
    studies: dict[str, dict[str, list[dict[str, Any]]]] = {"same_lr": {arm: [] for arm in args.arms}}
    if selection:
        studies["selected"] = {arm: [] for arm in args.arms}
    for study, results in studies.items():
        for seed in args.seeds:  # seed-major: every arm gets its first seed early
            for arm in args.arms:
                start = [f"model.pretrained={checkpoint}"] if arm != "scratch" else []
                setting = selection["arms"][arm]["selected"] if study == "selected" else PRESET_SETTINGS[arm]
                # named by the setting: a study whose setting is the other's reuses its runs
                result = train_run(args.runs / f"{arm}-{setting_label(setting)}-s{seed}",
                                   [*TRANSFER, *ARMS[arm], *start, *setting_overrides(setting), f"run.seed={seed}",
                                    *extra], args.data)
                result.update(seed=seed, setting=setting)
                results[arm].append(result)
                write_outputs(aggregate(studies, pretrain_result, selection), args.out, args.figure)
                print(f"--- {study} {arm} seed {seed}: top-1 {result['val']['top1']:.2f}% "
                      f"({result['mean_epoch_time_s']:.1f} s/epoch)", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the scripts' shared helpers (benchmarks._commit), as when the tests import them
    sys.exit(main())
