"""Does forward cross attention help? The paper's fcaformer_l1 on the whole Imagenette train split, on one GPU.

Trains every (variant, seed) pair at the same time, one ``fcaformer train`` process each (the ``repro_gpu``
preset: the packed dataset decoded onto the GPU and augmented there, bf16, channels-last), then aggregates:
mean ± std of the final val top-1 per variant, Welch's t-test against ``no_cross``, per-epoch curves, the
layer-scale and LSF values the models reached, and an fp16 safetensors checkpoint of each variant's first seed.

Variants: ``fca_release`` (cross attention, LSF before the cross-token LayerNorm as released),
``no_cross`` (the identical network without cross tokens), ``fca_post_norm`` (LSF after the LayerNorm).

With ``--epochs auto`` the number of epochs is fitted to ``--budget-s``: all runs first train a few steps
together on synthetic data (same model, augmentation, precision and concurrency) to measure the card's
throughput; if fewer than ``--min-epochs`` fit, ``fca_post_norm`` is dropped first. Runs still going at the
deadline are stopped (their last evaluated epoch is reported as such).

    fcaformer pack ../shared/data/imagenette-160 .gpu/imagenette-144.npz --size 144 --quality 75
    python benchmarks/cross_attention_gpu.py --pack .gpu/imagenette-144.npz --out runs/xattn --budget-s 330
    python benchmarks/cross_attention_gpu.py --pack tiny.npz --out /tmp/x --quick --device cpu   # rehearsal
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "fca_release": {"cross_attention": True, "lsf": "release"},
    "no_cross": {"cross_attention": False},
    "fca_post_norm": {"cross_attention": True, "lsf": "post_norm"},
}
# The CPU rehearsal: a tiny network at 32 px, two epochs, every code path of the real run.
QUICK = ["model.kwargs.dims=[16,16,32,32]", "model.kwargs.depths=[1,1,3,1]", "model.kwargs.num_heads=[1,1]",
         "data.img_size=32", "data.store_size=40", "run.batch_size=8", "run.eval_every=1", "run.amp=none",
         "run.channels_last=false", "run.threads=1", "optim.warmup_epochs=0"]
STARTUP_S = 30.0  # per run, in parallel: interpreter, imports, decoding the pack, building the model
FINISH_S = 25.0  # aggregation and checkpoint conversion after the runs


def child_env() -> dict[str, str]:
    paths = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "2"}


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ calibration
def calibrate_one(variant: str, overrides: list[str], steps: int) -> float:
    """Training images per second of one run of the real recipe on synthetic uint8 images (this process)."""
    import torch
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    from fcaformer.fast import set_fast_attention
    from fcaformer.train import load_config
    from fcaformer.train.device_data import DeviceAugment
    from fcaformer.train.distributed import resolve_device
    from fcaformer.train.engine import build_model, seed_everything
    from fcaformer.train.evaluate import autocast

    config = load_config("repro_gpu", [*overrides, *arch_overrides(variant), "data.root=calibration"])
    d, a, run = config.data, config.aug, config.run
    device = resolve_device(run.device)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    seed_everything(0)
    model, _ = build_model(config, 10)
    model.to(device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    set_fast_attention(model)
    optimizer = create_optimizer_v2(model, config.optim.opt, lr=1e-4, weight_decay=config.optim.weight_decay)
    store = d.store_size or int(math.floor(d.img_size / d.crop_pct))
    pixels = torch.randint(0, 256, (run.batch_size, 3, store, store), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (run.batch_size,), device=device)
    augment = DeviceAugment(d.img_size, a.scale, hflip=a.hflip, color_jitter=a.color_jitter, mean=d.mean, std=d.std)
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, label_smoothing=a.smoothing,
                  num_classes=10) if a.mixup or a.cutmix else None
    generator = torch.Generator(device=device).manual_seed(0)
    criterion = SoftTargetCrossEntropy()

    def step() -> None:
        images = augment(pixels, generator)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.nn.functional.one_hot(labels, 10).float()
        if mixup is not None:
            images, targets = mixup(images, labels)
        with autocast(device, run.amp):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(max(3, steps // 3)):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * run.batch_size / (time.perf_counter() - begin)


def calibrate(runs: list[tuple[str, int]], overrides: list[str], steps: int, start: float) -> float:
    """Aggregate training throughput (images/s) of ``len(runs)`` processes sharing the device."""
    code = ("import sys, json; sys.path.insert(0, {bench!r}); import cross_attention_gpu as x; "
            "print('IMG_S', x.calibrate_one(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))")
    code = code.format(bench=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, variant, json.dumps(overrides), str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for variant, _ in runs]
    rates = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"calibration failed:\n{err[-3000:]}")
        rates.append(float(out.split("IMG_S")[-1]))
    log(f"calibration: {len(runs)} concurrent runs, {sum(rates):.0f} training images/s in all "
        f"({', '.join(f'{r:.0f}' for r in rates)})", start)
    return sum(rates)


def fit_epochs(rate: float, runs: int, train_images: int, val_images: int, eval_every: int, seconds: float) -> int:
    """Epochs that ``runs`` concurrent runs finish in ``seconds`` at ``rate`` training images/s in all (an
    evaluated image costs about a third of a trained one)."""
    per_epoch = runs * (train_images + val_images / (3 * eval_every))
    return int(seconds * rate / per_epoch)


# ------------------------------------------------------------------------------------------------ the runs
def arch_overrides(variant: str) -> list[str]:
    return [f"model.kwargs.{key}={json.dumps(value)}" for key, value in VARIANTS[variant].items()]


def launch(runs: list[tuple[str, int]], pack: Path, folder: Path, overrides: list[str], deadline: float,
           start: float) -> dict[str, int]:
    """Start every run as its own ``fcaformer train`` process; wait until all end or the deadline passes
    (then stop the rest). Returns each run's exit code (``None`` stopped at the deadline -> -9)."""
    procs = {}
    for variant, seed in runs:
        name = f"{variant}-s{seed}"
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fcaformer", "train", "--config", "repro_gpu", "--no-progress", "--set",
                   f"data.root={pack}", f"run.seed={seed}", f"run.output={out}", *arch_overrides(variant),
                   *overrides]
        handle = open(out / "stdout.log", "w")  # noqa: SIM115 (closed when the process ends)
        procs[name] = (subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(),
                                        cwd=REPO), handle)
    log(f"started {len(procs)} runs: {', '.join(procs)}", start)
    codes: dict[str, int] = {}
    while len(codes) < len(procs):
        for name, (proc, handle) in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
                handle.close()
                log(f"{name} finished (exit {proc.returncode})", start)
        if time.perf_counter() > deadline:
            for name, (proc, handle) in procs.items():
                if name not in codes:
                    proc.kill()
                    proc.wait()
                    handle.close()
                    codes[name] = -9
                    log(f"{name} stopped at the deadline", start)
        time.sleep(1.0)
    return codes


# ------------------------------------------------------------------------------------------------ analysis
def parameter_stats(model: Any) -> dict[str, Any]:
    """Per Fca block: mean |layer scale| of the attention and MLP branches, LSF mean/min/max, mean |cross bias|."""
    import torch

    from fcaformer.layers import FcaBlock

    with torch.no_grad():
        return _parameter_stats(model, FcaBlock)


def _parameter_stats(model: Any, block_type: type) -> dict[str, Any]:
    blocks = {}
    for name, module in model.named_modules():
        if not isinstance(module, block_type):
            continue
        entry: dict[str, float] = {}
        for branch in ("ls1", "ls2"):
            gamma = getattr(getattr(module, branch), "gamma", None)
            if gamma is not None:
                entry[f"{branch}_abs_mean"] = float(gamma.abs().mean())
        scale = getattr(module, "cross_scale", None)
        if scale is not None:
            entry.update(lsf_mean=float(scale.mean()), lsf_min=float(scale.min()), lsf_max=float(scale.max()))
        if module.attn.cross_bias is not None:
            entry["cross_bias_abs_mean"] = float(module.attn.cross_bias.abs().mean())
        blocks[name] = entry
    return blocks


def aggregate(folder: Path, runs: list[tuple[str, int]], codes: dict[str, int], out: Path,
              meta: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fcaformer.files import atomic_json_dump
    from fcaformer.train.metrics import read_jsonl, welch_test
    from fcaformer.weights import load_model
    from fcaformer.weights.project import save_model

    per_run: dict[str, Any] = {}
    for variant, seed in runs:
        name = f"{variant}-s{seed}"
        run_dir = folder / name
        history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        entry: dict[str, Any] = {"variant": variant, "seed": seed, "exit_code": codes.get(name), "history": history,
                                 "log_tail": (run_dir / "stdout.log").read_text()[-1500:]
                                 if (run_dir / "stdout.log").exists() else ""}
        results = run_dir / "results.json"
        if results.exists():
            data = json.loads(results.read_text())
            entry.update(final=True, top1=data["val"]["top1"], top5=data["val"]["top5"], params=data["params"],
                         macs=data["macs"], epochs=data["epochs_done"], steps=data["steps"],
                         mean_epoch_time_s=data["mean_epoch_time_s"], per_class_acc=data["per_class_acc"])
        else:
            evaluated = [h for h in history if h.get("val_top1") is not None]
            entry.update(final=False, top1=evaluated[-1]["val_top1"] if evaluated else None,
                         epochs=evaluated[-1]["epoch"] if evaluated else 0)
        if (run_dir / "model.pt").exists():
            model, raw = load_model(run_dir / "model.pt")
            entry["parameters"] = parameter_stats(model)
            checkpoint = out / f"{variant}.safetensors"
            if not checkpoint.exists():  # the first seed of each variant, in half precision
                save_model(checkpoint, model, raw["model_name"], raw["model_kwargs"], dtype=torch.float16,
                           class_names=raw.get("class_names"), metrics=raw.get("metrics", {}),
                           data_config=raw.get("data_config"), train_config=raw.get("train_config"))
        per_run[name] = entry

    table = {}
    for variant in dict.fromkeys(v for v, _ in runs):
        finals = [r for r in per_run.values() if r["variant"] == variant and r.get("final")]
        top1 = [r["top1"] for r in finals]
        table[variant] = {"seeds": [r["seed"] for r in finals], "top1": top1,
                          "top1_mean": statistics.mean(top1) if top1 else None,
                          "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
                          "top5_mean": statistics.mean(r["top5"] for r in finals) if finals else None,
                          "params": finals[0]["params"] if finals else None,
                          "macs": finals[0]["macs"] if finals else None}
    baseline = table.get("no_cross", {}).get("top1", [])
    tests = {v: welch_test(row["top1"], baseline) for v, row in table.items() if v != "no_cross"}
    result = {**meta, "variants": table, "welch_vs_no_cross": tests, "runs": per_run}
    atomic_json_dump(result, out / "results.json")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    from fcaformer.files import pyplot, save_figure

    plt = pyplot()

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    seen = set()
    for run in result["runs"].values():
        label = run["variant"] if run["variant"] not in seen else None
        seen.add(run["variant"])
        points = [(h["epoch"], h["val_top1"]) for h in run["history"] if h.get("val_top1") is not None]
        if points:
            ax_acc.plot(*zip(*points), color=colors[run["variant"]], alpha=0.8, marker=".", label=label)
        losses = [(h["epoch"], h["train_loss"]) for h in run["history"]]
        if losses:
            ax_loss.plot(*zip(*losses), color=colors[run["variant"]], alpha=0.6, label=label)
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="Imagenette val top-1, every run")
    ax_loss.set(xlabel="epoch", ylabel="train loss (mixup targets)", title="training loss, every run")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"fcaformer_l1, {result['img_size']} px, {result['epochs']} epochs, {result['card']}")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True, help="packed dataset (fcaformer pack)")
    parser.add_argument("--out", type=Path, required=True, help="results.json, curves.png, checkpoints")
    parser.add_argument("--runs", type=Path, help="run folders (default: OUT/runs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", default="auto", help="an int, or auto: fit to --budget-s")
    parser.add_argument("--min-epochs", type=int, default=50)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock limit of the whole script")
    parser.add_argument("--calibration-steps", type=int, default=30)
    parser.add_argument("--safety", type=float, default=0.85,
                        help="plan with this fraction of the calibrated throughput (other work may share the card)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny network at 32 px: the CPU rehearsal")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s - FINISH_S
    sys.path.insert(0, str(REPO / "src"))
    from fcaformer.train.device_data import read_pack_meta

    pack = args.pack.resolve()
    counts = read_pack_meta(pack)["counts"]
    overrides = [f"run.device={args.device}", *(QUICK if args.quick else []), *args.set]
    from fcaformer.train import load_config

    config = load_config("repro_gpu", [*overrides, f"data.root={pack}"])
    runs = [(v, s) for s in args.seeds for v in args.variants]
    if args.epochs == "auto":
        rate = args.safety * calibrate(runs, overrides, args.calibration_steps, start)
        seconds = deadline - time.perf_counter() - STARTUP_S
        fit = lambda n: fit_epochs(rate, n, counts["train"], counts["val"], config.run.eval_every, seconds)
        epochs = fit(len(runs))
        if epochs < args.min_epochs and "fca_post_norm" in args.variants and len(args.variants) > 1:
            runs = [(v, s) for v, s in runs if v != "fca_post_norm"]
            log(f"only {epochs} epochs fit with fca_post_norm: dropped it", start)
            epochs = fit(len(runs))
        epochs = max(1, min(epochs, args.max_epochs))
    else:
        rate, epochs = None, int(args.epochs)
    overrides.append(f"run.epochs={epochs}")
    log(f"{len(runs)} runs x {epochs} epochs ({'fitted to the budget' if rate else 'as given'})", start)
    folder = args.runs or args.out / "runs"
    codes = launch(runs, pack, folder, overrides, deadline, start)
    import torch

    meta = {"img_size": config.data.img_size, "epochs": epochs, "pack": pack.name, "pack_counts": counts,
            "calibrated_images_per_s": rate, "overrides": overrides, "config": config.to_dict(),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU",
            "torch": torch.__version__, "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    result = aggregate(folder, runs, codes, args.out, meta)
    plot(result, args.out / "curves.png")
    for variant, row in result["variants"].items():
        mean = "-" if row["top1_mean"] is None else f"{row['top1_mean']:.2f}"
        std = "-" if row["top1_std"] is None else f"{row['top1_std']:.2f}"
        log(f"{variant}: top-1 {mean} ± {std} over seeds {row['seeds']} ({row['top1']})", start)
    for variant, test in result["welch_vs_no_cross"].items():
        if test:
            log(f"Welch {variant} vs no_cross: diff {test['diff']:+.2f}, t {test['t']:.2f}, p {test['p']:.3f}", start)
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
