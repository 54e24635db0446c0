"""Does adding forward cross attention to a trained timm ViT / Swin help it learn more? Imagenette, 64 px, CPU.

1. **Sources**: a small timm ViT (``vit_tiny_patch16_224`` resized: patch 8, dim 128, depth 6, 4 heads; 10 epochs)
   and a small Swin (``swin_tiny_patch4_window7_224`` resized: dim 32, depths 2-2-4, heads 1-2-4, window 8; 6
   epochs) are trained from scratch on all 9,469 Imagenette training images at 64 px, and saved as fp16
   safetensors project checkpoints (``<out>/<model>_imagenette64.safetensors``; the tests convert them).
2. **Conversion**: each source is converted (``fcaformer.add_forward_cross_attention``, calibrated on the 256
   training images ``fcaformer train`` would use; for a few closing strengths, and once without calibration) and
   compared with itself on all 3,925 val images: top-1 agreement, relative logit changes, the cross tokens' share
   of the attention, and the gradients of the new parts next to AdamW's eps.
3. **Fine-tuning**, the same budget per arm (3 epochs), seeds 0-2, the arms interleaved:

   - ``plain``: the source trained further as it is;
   - ``fca``: the source converted (``model.forward_cross_attention=true``), then trained with the same recipe.

   Each is evaluated on all val images; per model the report gives mean ± std per arm, the difference with its
   95 % confidence interval, Welch's t-test, the power of that test against a true 1-point difference, and where
   fine-tuning took the fca runs' cross tokens (their share of the attention, the mean cross-token bias).

Every run writes its own folder under ``--runs``; finished runs are skipped and interrupted ones resumed, so the
script can be restarted at any time. After every run the aggregate (``<out>/results.json``, ``results.md``) and
the figure are rewritten.

    nohup nice -n 10 python benchmarks/any_vit_fca.py > runs/any_vit.log 2>&1 &
    # smoke version (about a minute)
    python benchmarks/any_vit_fca.py --quick --seeds 0 --runs /tmp/av --out /tmp/av/out --figure /tmp/av/f.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

MODELS: dict[str, list[str]] = {
    "vit": ["model.name=vit_tiny_patch16_224", "model.kwargs.patch_size=8", "model.kwargs.embed_dim=128",
            "model.kwargs.depth=6", "model.kwargs.num_heads=4"],
    "swin": ["model.name=swin_tiny_patch4_window7_224", "model.kwargs.embed_dim=32", "model.kwargs.depths=[2,2,4]",
             "model.kwargs.num_heads=[1,2,4]", "model.kwargs.window_size=8"],
}
# The repro preset's recipe (AdamW at batch 32, cosine, label smoothing 0.1, light augmentation, one thread) on
# every training image at 64 px, evaluated once at the end on every val image with precise BN.
COMMON = ["data.img_size=64", "data.train_per_class=null", "run.threads=1", "run.progress=false",
          "run.eval_every=1000", "run.precise_bn_images=null", "data.cache=true", "data.verify_images=false"]
# lr 3e-4 at batch 32: the repro preset's 2e-3 (for the conv hybrid) collapses a ViT's attention (logits spanning
# hundreds, one-hot attention maps), which no trained-in-earnest ViT shows.
SOURCE: dict[str, list[str]] = {"vit": ["run.epochs=10", "optim.lr=3e-4", "run.seed=0"],
                                 "swin": ["run.epochs=6", "optim.lr=3e-4", "run.seed=0"]}
FINETUNE = ["run.epochs=3", "optim.lr=2e-4", "optim.warmup_epochs=0.3"]
ARMS: dict[str, list[str]] = {
    "plain": [],
    "fca": ["model.forward_cross_attention=true"],
    # the same conversion without cross tokens: what the Fca blocks' other new parts (the TME enhance conv, the
    # split LayerNorm) do on their own
    "fca_no_cross": ["model.forward_cross_attention=true", "model.kwargs.cross_attention=false"],
}
COMPARISONS = (("fca", "plain"), ("fca_no_cross", "plain"), ("fca", "fca_no_cross"))
"""Pairs of arms compared with Welch's test (first − second)."""
QUICK = ["run.epochs=1", "data.train_per_class=8", "data.val_per_class=4", "data.cache=false"]
OPENING_STEPS, OPENING_IMAGES = 300, 2048  # the opening check: steps of 32 images, from this many training images
EFFECT = 1.0  # points of top-1: the difference whose detection the power analysis asks about


def train_run(out: Path, overrides: list[str], data_root: str) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run; returns its results.json content."""
    from fcaformer.train import load_config, train_or_resume

    print(f"=== {out.name}", flush=True)
    return train_or_resume(load_config("repro", [f"data.root={data_root}", f"run.output={out}", *COMMON, *overrides]))


def source(model: str, runs: Path, out: Path, data_root: str, extra: list[str]) -> tuple[Path, dict[str, Any]]:
    """The trained source model, saved as an fp16 safetensors project checkpoint (what the arms start from)."""
    from benchmarks._commit import commit_checkpoint

    result = train_run(runs / f"{model}-source", [*MODELS[model], *SOURCE[model], *extra], data_root)
    checkpoint = out / f"{model}_imagenette64.safetensors"
    if not checkpoint.exists():
        commit_checkpoint(runs / f"{model}-source" / "model.pt", checkpoint, REPO)
    return checkpoint, result


def val_batches(data_root: str, extra: list[str]) -> list[tuple[Any, Any]]:
    """Every val image at 64 px under the eval transform, in batches of 128 (decoded once)."""
    from fcaformer.train import load_config
    from fcaformer.train.data import ImageDataset, build_transforms, eval_loader, load_image_lists

    config = load_config("repro", [f"data.root={data_root}", *COMMON, *extra])
    _, val = load_image_lists(config.data)
    return list(eval_loader(ImageDataset(val, build_transforms(config)[1]), 128, 0))


def cross_attention_share(model: Any, images: Any) -> list[float]:
    """Per Fca block with cross tokens: the attention mass its queries put on the cross tokens (mean over images,
    heads and queries), read from the attention probes in eval mode."""
    import torch

    from fcaformer.layers import FcaBlock

    blocks = [m for m in model.modules() if isinstance(m, FcaBlock) and m.attn.cross_bias is not None]
    shares: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}

    def probe(index: int, cross: int):
        return lambda module, args, out: shares[index].append(out[..., -cross:].sum(-1).mean())

    hooks = [b.attn.attn_probe.register_forward_hook(probe(i, b.attn.cross_bias.shape[-1]))
             for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.stack(values).mean().item() for values in shares.values()]


def compare_predictions(model: Any, converted: Any, batches: list[tuple[Any, Any]]) -> dict[str, float]:
    """Both models in eval mode on ``batches``: top-1 of each (%), the agreement of their top-1 predictions (%), the
    relative change of all logits together (``||L' - L|| / ||L||``), the share of images whose own relative change
    ``|l' - l| / |l|`` is below 1e-3 (%), and the largest such per-image change."""
    import torch

    agree = correct = correct_converted = within = seen = 0
    worst = change = total = 0.0
    with torch.no_grad():
        for images, targets in batches:
            before, after = model.eval()(images), converted.eval()(images)
            per_image = (after - before).norm(dim=1) / before.norm(dim=1)
            worst = max(worst, per_image.max().item())
            within += (per_image < 1e-3).sum().item()
            change += (after - before).square().sum().item()
            total += before.square().sum().item()
            agree += (before.argmax(1) == after.argmax(1)).sum().item()
            correct += (before.argmax(1) == targets).sum().item()
            correct_converted += (after.argmax(1) == targets).sum().item()
            seen += len(targets)
    return {"top1_source": 100 * correct / seen, "top1_converted": 100 * correct_converted / seen,
            "top1_agreement": 100 * agree / seen, "relative_logit_change": (change / total) ** 0.5,
            "images_within_1e-3": 100 * within / seen, "max_relative_logit_change": worst}


def calibration_images(data_root: str, extra: list[str], count: int | None = None) -> Any:
    """The training images ``fcaformer train`` calibrates a converted model on (eval transform, seed 0), or the
    first ``count`` of a larger such draw, with their labels when ``count`` is given."""
    from fcaformer.train import load_config
    from fcaformer.train.data import ImageDataset, build_transforms, load_image_lists
    from fcaformer.train.engine import CALIBRATION_IMAGES
    from fcaformer.train.precise_bn import calibration_loader

    config = load_config("repro", [f"data.root={data_root}", *COMMON, *extra])
    train, _ = load_image_lists(config.data)
    dataset = ImageDataset(train, build_transforms(config)[1])
    if count is None:
        return next(iter(calibration_loader(dataset, CALIBRATION_IMAGES, CALIBRATION_IMAGES, 0, 0)))[0]
    return next(iter(calibration_loader(dataset, count, count, 0, 1)))


def conversion_check(checkpoint: Path, batches: list[tuple[Any, Any]], calibration: Any) -> dict[str, Any]:
    """The source against its converted self on every val image (eval mode, fp32), calibrated on training images,
    for the default closed cross-token bias and others, and once without calibration images: the comparison of
    :func:`compare_predictions`, the cross tokens' share of the attention, and the mean |gradient| of every kind of
    new parameter (one batch of 128 val images, training mode) next to AdamW's eps."""
    import torch

    from fcaformer import add_forward_cross_attention
    from fcaformer.models.any_vit import CLOSED_CROSS_BIAS
    from fcaformer.weights import load_model

    model, _ = load_model(checkpoint)
    model.eval()
    result: dict[str, Any] = {"val_images": sum(len(t) for _, t in batches), "calibration_images": len(calibration),
                              "default_cross_bias": CLOSED_CROSS_BIAS, "sweep": {}}
    settings = [(bias, True) for bias in (-4.0, -6.0, CLOSED_CROSS_BIAS, -10.0)] + [(CLOSED_CROSS_BIAS, False)]
    for bias, calibrated in settings:
        converted = add_forward_cross_attention(model, cross_bias_init=bias,
                                                calibration_images=calibration if calibrated else None)
        predictions = compare_predictions(model, converted, batches)
        images, targets = batches[0]
        share = cross_attention_share(converted, images)
        torch.nn.functional.cross_entropy(converted.train()(images), targets).backward()
        gradients: dict[str, list[float]] = {}
        for name, param in converted.named_parameters():
            kind = next((k for k in ("cross_bias", "cross_scale", "norm_cross", "merge", "enhance.conv", "enhance.bn",
                                     "attn.qkv") if k in name), None)
            if kind is not None and param.grad is not None:
                gradients.setdefault(kind, []).append(param.grad.abs().mean().item())
        result["sweep"][f"{bias:g}" + ("" if calibrated else " (no calibration)")] = {
            **predictions, "cross_attention_share": sum(share) / len(share),
            "mean_abs_gradient": {kind: sum(v) / len(v) for kind, v in gradients.items()},
        }
    return {**result, **result["sweep"][f"{CLOSED_CROSS_BIAS:g}"]}


def opening_check(checkpoint: Path, calibration: Any, train_images: tuple[Any, Any], batches: list[tuple[Any, Any]],
                  steps: int = OPENING_STEPS, lr: float = 1e-3) -> dict[str, Any]:
    """Can the new parts learn to use the cross tokens? The source converted (calibrated), then only its new parts
    (cross-token biases, LSFs, cross-token LayerNorm, merge, enhance) trained with AdamW at ``lr`` for ``steps``
    batches of 32 training images (eval transform, a fixed subset), everything else frozen: the cross tokens'
    share of the attention and the val loss and top-1 (1,024 val images, 8 batches spread over the classes) before
    and after."""
    import torch

    from fcaformer import add_forward_cross_attention
    from fcaformer.weights import load_model

    model = add_forward_cross_attention(load_model(checkpoint)[0], calibration_images=calibration)
    new = [p for n, p in model.named_parameters()
           if any(k in n for k in ("cross_bias", "cross_scale", "norm_cross", "merge", "enhance"))]
    model.requires_grad_(False)
    for param in new:
        param.requires_grad_(True)
    val = batches[:: max(1, len(batches) // 8)][:8]  # spread over the (class-sorted) val set

    def measure() -> dict[str, float]:
        with torch.no_grad():
            outputs = [(model.eval()(x), y) for x, y in val]
        loss = sum(torch.nn.functional.cross_entropy(o, y, reduction="sum").item() for o, y in outputs)
        count = sum(len(y) for _, y in val)
        share = cross_attention_share(model, val[0][0])
        return {"cross_attention_share": sum(share) / len(share), "val_loss": loss / count,
                "val_top1": 100 * sum((o.argmax(1) == y).sum().item() for o, y in outputs) / count}

    before = measure()
    optimizer = torch.optim.AdamW(new, lr=lr, weight_decay=0.0)
    images, targets = train_images
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(images), (32,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images[pick]), targets[pick]).backward()
        optimizer.step()
    return {"steps": steps, "lr": lr, "before": before, "after": measure()}


def fca_run_analysis(run: Path, batches: list[tuple[Any, Any]], start: Any) -> dict[str, Any]:
    """Where fine-tuning took a converted model's new parts, against ``start`` (the source converted as the run
    converted it): the cross tokens' share of the attention on 256 val images, the mean cross-token bias and how
    far the biases moved (mean |change|)."""
    import torch

    from fcaformer.weights import load_model

    model, _ = load_model(run / "model.pt")
    images = torch.cat([images for images, _ in batches[:2]])
    share = cross_attention_share(model, images)
    before = dict(start.named_parameters())
    biases = [(p.detach(), before[n].detach()) for n, p in model.named_parameters() if n.endswith("cross_bias")]
    return {"cross_attention_share": sum(share) / len(share), "cross_attention_share_per_block": share,
            "mean_cross_bias": sum(b.mean().item() for b, _ in biases) / len(biases),
            "mean_cross_bias_change": sum((b - a).abs().mean().item() for b, a in biases) / len(biases)}


def welch_power(effect: float, std_a: float, std_b: float, n_a: int, n_b: int) -> float:
    """Power of Welch's two-sided test at the 5 % level to detect a true difference ``effect`` when the arms' seed
    spreads are ``std_a`` and ``std_b`` (non-central t with Welch-Satterthwaite degrees of freedom)."""
    from scipy.stats import nct
    from scipy.stats import t as student

    var_a, var_b = std_a**2 / n_a, std_b**2 / n_b
    if var_a + var_b == 0:
        return 1.0
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    critical = student.ppf(0.975, df)
    shift = effect / (var_a + var_b) ** 0.5
    return float(nct.sf(critical, df, shift) + nct.cdf(-critical, df, shift))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def compare(fca: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """One arm − another (e.g. fca − plain): difference of the means, Welch's t-test with its 95 % CI, and its
    power against :data:`EFFECT` points at the observed spreads."""
    from fcaformer.train.metrics import welch_test

    welch = welch_test(fca["top1"], plain["top1"])
    if welch is None:
        return {"diff": fca["top1_mean"] - plain["top1_mean"]}
    power = welch_power(EFFECT, fca["top1_std"], plain["top1_std"], len(fca["top1"]), len(plain["top1"]))
    # undefined (NaN) where the two arms have no spread in their difference: null in the JSON, "n/a" in the report
    return {**welch, f"power_at_{EFFECT:g}_point": None if math.isnan(power) else power}


def aggregate(results: dict[str, dict[str, list[dict[str, Any]]]], sources: dict[str, dict[str, Any]],
              checks: dict[str, dict[str, Any]], analyses: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    from fcaformer.benchmark import machine_info
    from fcaformer.train.metrics import summarise_seeds

    table: dict[str, Any] = {
        "machine": machine_info(),
        "overrides": {"models": MODELS, "common": COMMON, "source": SOURCE, "finetune": FINETUNE, "arms": ARMS},
        "models": {},
    }
    for model, arms in results.items():
        summary = {arm: summarise_seeds(runs) for arm, runs in arms.items() if runs}
        src = sources[model]
        table["models"][model] = {
            "label": src["model"], "params": src["params"],
            "source": {"top1": src["val"]["top1"], "epochs": src["epochs_done"], "steps": src["steps"],
                       "epoch_time_s": src["mean_epoch_time_s"]},
            "conversion": checks[model],
            "arms": summary,
            "versus": {f"{a} - {b}": compare(summary[a], summary[b]) for a, b in COMPARISONS
                       if a in summary and b in summary},
            "fca_after_finetuning": analyses[model],
        }
    return table


def write_outputs(table: dict[str, Any], out: Path, figure: Path) -> None:
    from fcaformer.files import atomic_report, pyplot, save_figure
    from fcaformer.train.metrics import plot_seed_panel

    plt = pyplot()

    machine = table["machine"]
    lines = [f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs (shared), torch {machine['torch']}", ""]
    for model, row in table["models"].items():
        lines += [f"{model}: {row['label']}, {row['params'] / 1e6:.2f} M params; source top-1 "
                  f"{row['source']['top1']:.2f} % after {row['source']['epochs']} epochs", "",
                  "conversion (all val images; gradients: mean |g| on 128 images, training mode):", "",
                  "| cross-token bias | top-1 agreement (%) | relative logit change, all | largest, per image "
                  "| cross share of attention | |g| cross bias | |g| norm_cross | |g| merge | |g| enhance conv "
                  "| |g| LSF |", "|---|---|---|---|---|---|---|---|---|---|"]
        for bias, sweep in row["conversion"]["sweep"].items():
            grads = " | ".join(f"{sweep['mean_abs_gradient'][kind]:.1e}"
                               for kind in ("cross_bias", "norm_cross", "merge", "enhance.conv", "cross_scale"))
            lines.append(f"| {bias} | {sweep['top1_agreement']:.2f} | {sweep['relative_logit_change']:.1e} | "
                         f"{sweep['max_relative_logit_change']:.1e} | {sweep['cross_attention_share']:.1e} | {grads} |")
        lines += ["", "| arm | seeds | top-1 mean ± std (%) | per seed | params | s/epoch |",
                  "|---|---|---|---|---|---|"]
        for arm, arm_row in row["arms"].items():
            per_seed = ", ".join(f"{v:.2f}" for v in arm_row["top1"])
            lines.append(f"| {arm} | {len(arm_row['seeds'])} | {arm_row['top1_mean']:.2f} ± {arm_row['top1_std']:.2f}"
                         f" | {per_seed} | {arm_row['params'] / 1e6:.3f} M | {arm_row['epoch_time_s']:.0f} |")
        for pair, versus in row["versus"].items():
            if "ci95" not in versus:
                continue
            low, high = versus["ci95"]
            lines += ["", f"{pair.replace(' - ', ' − ')}: {versus['diff']:+.2f} points, 95 % CI [{low:+.2f}, "
                      f"{high:+.2f}], Welch t {versus['t']:.2f}, {versus['df']:.1f} df, p {versus['p']:.2g}; power "
                      f"against a 1-point difference: {_number(versus[f'power_at_{EFFECT:g}_point'])}"]
        for opening in row["conversion"].get("opening", []):
            before, after = opening["before"], opening["after"]
            lines += ["", f"opening check (only the new parts trained, {opening['steps']} AdamW steps at lr "
                      f"{opening['lr']:g}): cross share {before['cross_attention_share']:.1e} -> "
                      f"{after['cross_attention_share']:.1e}, val loss {before['val_loss']:.4f} -> "
                      f"{after['val_loss']:.4f}, val top-1 {before['val_top1']:.2f} -> {after['val_top1']:.2f} %"]
        at_conversion = row["conversion"]["cross_attention_share"]
        for run in row["fca_after_finetuning"]:
            lines.append(f"- fca seed {run['seed']} after fine-tuning: cross share of attention "
                         f"{run['cross_attention_share']:.1e} (at conversion {at_conversion:.1e}), mean cross-token "
                         f"bias {run['mean_cross_bias']:+.2f}, moved by {run['mean_cross_bias_change']:.3f} on average")
        lines.append("")
    atomic_report(table, "\n".join(lines), out / "results")

    models = list(table["models"].items())
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (model, row) in zip(axes[0], models):
        plot_seed_panel(ax, {arm: arm_row["top1"] for arm, arm_row in row["arms"].items()}, model, "val top-1 (%)",
                        reference=(row["source"]["top1"], "source"), legend_loc="lower right")
    fig.suptitle("Imagenette 64 px: trained further as is (plain), with forward cross attention added (fca), or "
                 "with the Fca blocks but no cross tokens (fca_no_cross)",
                 fontsize=10)
    save_figure(fig, figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources-only", action="store_true", help="train and save the source models, then stop")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenette-160"))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "any_vit", help="one folder per run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "any_vit",
                        help="aggregate and the source checkpoints")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "any_vit.png")
    parser.add_argument("--quick", action="store_true",
                        help="one epoch, 8 training and 4 val images per class (a smoke test)")
    args = parser.parse_args(argv)
    extra = QUICK if args.quick else []

    from fcaformer import add_forward_cross_attention
    from fcaformer.files import atomic_json_dump
    from fcaformer.weights import load_model

    checkpoints, sources, checks = {}, {}, {}
    for model in args.models:
        checkpoints[model], sources[model] = source(model, args.runs, args.out, args.data, extra)
        print(f"--- {model} source: top-1 {sources[model]['val']['top1']:.2f}%", flush=True)
    if args.sources_only:
        return 0
    batches = val_batches(args.data, extra)
    calibration = calibration_images(args.data, extra)
    starts = {}
    opening_images = calibration_images(args.data, extra, 64 if args.quick else OPENING_IMAGES)
    for model in args.models:
        saved = args.runs / f"{model}-conversion.json"  # kept with the runs: a restarted script reuses it
        if saved.exists():
            checks[model] = json.loads(saved.read_text())
        else:
            checks[model] = conversion_check(checkpoints[model], batches, calibration)
            checks[model]["opening"] = [opening_check(checkpoints[model], calibration, opening_images, batches,
                                                      lr=lr, steps=3 if args.quick else OPENING_STEPS)
                                        for lr in (1e-3, 1e-2)]
            atomic_json_dump(checks[model], saved)
        print(f"--- {model} converted: {json.dumps(checks[model])}", flush=True)
        starts[model] = add_forward_cross_attention(load_model(checkpoints[model])[0], calibration_images=calibration)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {arm: [] for arm in ARMS} for m in args.models}
    analyses: dict[str, list[dict[str, Any]]] = {m: [] for m in args.models}
    for model in args.models:  # model by model; within a model seed-major, the arms interleaved
        for seed in args.seeds:
            for arm, arm_overrides in ARMS.items():
                run = args.runs / f"{model}-{arm}-s{seed}"
                result = train_run(run, [*MODELS[model], *FINETUNE, *arm_overrides,
                                         f"model.pretrained={checkpoints[model]}", f"run.seed={seed}", *extra],
                                   args.data)
                result["seed"] = seed
                results[model][arm].append(result)
                if arm == "fca":
                    analyses[model].append({"seed": seed, **fca_run_analysis(run, batches, starts[model])})
                write_outputs(aggregate(results, sources, checks, analyses), args.out, args.figure)
                print(f"--- {model} {arm} seed {seed}: top-1 {result['val']['top1']:.2f}% "
                      f"({result['mean_epoch_time_s']:.1f} s/epoch)", flush=True)
    table = aggregate(results, sources, checks, analyses)
    print(f"--- comparisons: {json.dumps({m: row['versus'] for m, row in table['models'].items()})}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the scripts' shared helpers (benchmarks._commit), as when the tests import them
    sys.exit(main())
