"""CPU deployment benchmark (issue 13): every runtime x precision x model, interleaved in one process; the
per-op profiles of FcaFormer-L1 before (fused graph) and after (lean graph); int8 accuracy of a trained L1.

Measures on this machine (default 2 threads, batch-1 latency and batch-32 throughput at 224x224):
- FcaFormer-L1 (randomised trained-like weights) and timm peers (``pretrained=False``, reparameterized where
  timm can) under PyTorch (fp32, bf16 autocast), ONNX Runtime (fp32, int8) and OpenVINO (fp32, bf16, int8);
  bf16 only where the CPU has native bf16 (else both runtimes would emulate or silently fall back to fp32);
- the release's computation (L1 faithful path, PyTorch fp32) as the baseline of every ratio;
- L1 as the fused graph (what ``export`` wrote before the lean graph) under OpenVINO, and the lean graph in
  PyTorch eager, to show what the lean graph changes;
- ``--passes`` interleaved passes over all batch-1 candidates (the goals are reported for every pass);
- per-op profiles (OpenVINO node types, PyTorch ops) and the layout share (transposes, reorders, concats,
  splits, gathers);
- accuracy on the full Imagenette val split of the trained L1 (``--checkpoint``; calibrated on ``--calib-images``
  Imagenette *train* images): top-1 of each runtime / precision and its top-1 agreement with PyTorch fp32.

Writes ``docs/deployment_results.{json,md}`` (docs/deployment.md discusses them).

    python benchmarks/deployment.py [--threads 2] [--repeats 30] [--passes 3] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fcaformer.benchmark import Timing, _build, interleaved_timings, machine_info, model_cost
from fcaformer.deploy import (
    OnnxRunner,
    OpenVinoRunner,
    TorchRunner,
    eval_transform,
    inference_graph,
    layout_share,
    list_images,
    load_images,
    openvino_precision_supported,
    quantize_onnx,
    quantize_openvino,
    to_onnx,
    to_openvino,
)
from fcaformer.fast import tune_cpu_allocator
from fcaformer.files import atomic_report, file_sha256, relative_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imagenette-160"
CHECKPOINT = ROOT / "docs" / "repro_gpu" / "checkpoints" / "fca_release.safetensors"
PEERS = ("efficientformer_l1", "deit_tiny_patch16_224", "levit_256", "repvit_m1_1", "convnext_femto",
         "efficientvit_b1")
RELEASE = "fcaformer_l1 (release)"
L1 = "fcaformer_l1"
CONFIGS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
           ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return set(next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def versions() -> dict[str, str]:
    import nncf
    import onnxruntime
    import openvino

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
            "nncf": nncf.__version__}


def build_runners(names: list[str], configs: list[tuple[str, str]], calibration: torch.Tensor,
                  threads: int) -> tuple[dict[tuple[str, str, str], Any], dict[str, tuple[float, float]]]:
    """Every (model label, runtime, precision) runner; graphs converted once per runtime and reused for int8."""
    runners: dict[tuple[str, str, str], Any] = {}
    costs: dict[str, tuple[float, float]] = {}
    size = (224, 224)
    for name in names:
        began = time.perf_counter()
        model = _build(name, 224)
        costs[name] = model_cost(model, 224)
        graphs = {runtime: inference_graph(model, runtime, size) for runtime in ("torch", "onnxruntime", "openvino")}
        if name == L1:
            costs[RELEASE] = costs[name]
            runners[(RELEASE, "torch", "fp32")] = TorchRunner(model)
            runners[(f"{L1} (lean graph)", "torch", "fp32")] = TorchRunner(graphs["openvino"])
            fused_ov = to_openvino(graphs["torch"], size)
            runners[(f"{L1} (fused graph)", "openvino", "fp32")] = OpenVinoRunner(fused_ov, threads, "fp32", 1)
            if ("openvino", "int8") in configs:
                runners[(f"{L1} (fused graph)", "openvino", "int8")] = OpenVinoRunner(
                    quantize_openvino(fused_ov, calibration), threads, "int8", 1)
        for runtime in dict.fromkeys(r for r, _ in configs):
            graph = graphs[runtime]
            precisions = [p for r, p in configs if r == runtime]
            if runtime == "torch":
                for precision in precisions:
                    runners[(name, runtime, precision)] = TorchRunner(graph, precision)
            elif runtime == "onnxruntime":
                data = to_onnx(graph, size)
                for precision in precisions:
                    model_bytes = quantize_onnx(data, calibration) if precision == "int8" else data
                    runners[(name, runtime, precision)] = OnnxRunner(model_bytes, threads, precision)
            else:
                ov_model = to_openvino(graph, size)
                for precision in precisions:
                    source = quantize_openvino(ov_model, calibration) if precision == "int8" else ov_model
                    runners[(name, runtime, precision)] = OpenVinoRunner(source, threads, precision, 1)
        print(f"built {name} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return runners, costs


def label(key: tuple[str, str, str]) -> str:
    return f"{key[0]} | {key[1]} {key[2]}"


def goals(timings: dict[str, Timing], configs: list[tuple[str, str]]) -> dict[str, float]:
    """The issue's latency ratios for one pass."""
    t = {k: v.median_ms for k, v in timings.items()}
    release = t[label((RELEASE, "torch", "fp32"))]
    out = {"torch fp32 fast / release": t[label((L1, "torch", "fp32"))] / release}
    low = [(r, p) for r, p in configs if p != "fp32"]
    if low:
        best = min(low, key=lambda c: t[label((L1, *c))])
        out[f"best low precision ({best[0]} {best[1]}) / release"] = t[label((L1, *best))] / release
    for runtime, precision in configs:
        peer = label(("efficientformer_l1", runtime, precision))
        if peer in t:
            out[f"L1 / efficientformer_l1, {runtime} {precision}"] = t[label((L1, runtime, precision))] / t[peer]
    if label((f"{L1} (fused graph)", "openvino", "fp32")) in t:
        out["openvino fp32: lean / fused graph"] = (t[label((L1, "openvino", "fp32"))]
                                                    / t[label((f"{L1} (fused graph)", "openvino", "fp32"))])
    return out


def profiles(runners: dict[tuple[str, str, str], Any], threads: int) -> list[dict[str, Any]]:
    """Per-op profiles of L1 (release, fast, fused vs lean graph) and efficientformer_l1, batch 1."""
    x = torch.randn(1, 3, 224, 224)
    chosen = [(RELEASE, "torch", "fp32"), (L1, "torch", "fp32"), (f"{L1} (fused graph)", "openvino", "fp32"),
              (L1, "openvino", "fp32"), ("efficientformer_l1", "openvino", "fp32"),
              (f"{L1} (fused graph)", "openvino", "int8"), (L1, "openvino", "int8"),
              ("efficientformer_l1", "openvino", "int8")]
    out = []
    for key in chosen:
        runner = runners.get(key)
        if runner is None:
            continue
        if isinstance(runner, OpenVinoRunner):  # a profiling copy: PERF_COUNT is off in the timed runners
            runner = OpenVinoRunner(runner.model, threads, runner.precision, 1, profile=True)
        ops = runner.profile(x, repeats=10)
        out.append({"model": key[0], "runtime": key[1], "precision": key[2], "layout_share": layout_share(ops),
                    "ops": [asdict(op) for op in ops[:10]]})
    return out


def accuracy(checkpoint: Path, calib_images: int, threads: int, configs: list[tuple[str, str]]) -> dict[str, Any]:
    """Top-1 of the trained L1 on the full Imagenette val split under each runtime / precision."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from fcaformer.deploy import build_runner
    from fcaformer.weights import load_model

    model, raw = load_model(checkpoint)
    data_config = raw["data_config"]
    size = (int(data_config["img_size"]),) * 2
    transform = eval_transform(data_config, size)
    calibration = load_images(list_images(DATA / "train", limit=calib_images), transform)
    chosen = [("torch", "fp32")] + [c for c in configs if c[0] != "torch" and (c[1] != "fp32" or c[0] == "openvino")]
    runners = {f"{r} {p}": build_runner(model, r, p, size, threads, calibration) for r, p in chosen}
    dataset = ImageFolder(str(DATA / "val"), transform)
    predictions: dict[str, list[torch.Tensor]] = {k: [] for k in runners}
    targets = []
    for images, labels in DataLoader(dataset, batch_size=50, num_workers=1):
        targets.append(labels)
        for key, runner in runners.items():
            predictions[key].append(torch.as_tensor(runner(images)).argmax(-1))
    y = torch.cat(targets)
    reference = torch.cat(predictions["torch fp32"])
    rows = {}
    for key, preds in predictions.items():
        p = torch.cat(preds)
        rows[key] = {"top1": 100 * (p == y).float().mean().item(),
                     "agreement_with_fp32": 100 * (p == reference).float().mean().item()}
    return {"checkpoint": relative_path(checkpoint, ROOT), "checkpoint_sha256": file_sha256(checkpoint),
            "images": len(y), "img_size": size[0], "calibration_images": calib_images,
            "calibration_split": "train", "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    machine, load = results["machine"], results["loadavg"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {results['threads']} threads per runtime, "
        f"AVX-512: {'yes' if results['avx512'] else 'no'}, native bf16: {'yes' if results['native_bf16'] else 'no'}, "
        f"VNNI: {'yes' if results['vnni'] else 'no'}; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + f". Load average (1 min): {load['start']:.2f} at start, {load['timing_start']:.2f} before timing, "
        f"{load['timing_end']:.2f} after timing, {load['end']:.2f} at end. Skipped: {results['skipped'] or 'none'}.",
        "", "### Goals (ratios of batch-1 medians within one interleaved pass; one column per pass)", "",
        "| ratio | " + " | ".join(f"pass {i + 1}" for i in range(len(results["goals"]))) + " |",
        "|---|" + "---:|" * len(results["goals"]),
    ]
    for key in results["goals"][0]:
        lines.append(f"| {key} | " + " | ".join(f"{g[key]:.2f}" for g in results["goals"]) + " |")
    lines += ["", "### Latency (batch 1, last pass) and throughput (batch 32), 224x224", "",
              "| model | runtime | precision | GMACs | b1 median (ms) | b1 p90 (ms) | vs release L1 | "
              "vs efficientformer_l1 (same runtime, precision) | b32 (img/s) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    table = results["table"]
    for row in table:
        lines.append(f"| {row['model']} | {row['runtime']} | {row['precision']} | {row['gmacs']:.3f} | "
                     f"{row['b1_median_ms']:.1f} | {row['b1_p90_ms']:.1f} | {row['vs_release']:.2f}x | "
                     + (f"{row['vs_efficientformer_l1']:.2f}x" if row.get("vs_efficientformer_l1") else "-")
                     + f" | {row['b32_images_per_s']:.1f} |")
    lines += ["", "### Per-op profiles (batch 1; share of node time)", "",
              "| model | runtime | layout + concat + gather share | largest op types |", "|---|---|---:|---|"]
    for prof in results["profiles"]:
        ops = ", ".join(f"{op['op']} {op['share']:.0%}" for op in prof["ops"][:7])
        lines.append(f"| {prof['model']} | {prof['runtime']} {prof['precision']} | {prof['layout_share']:.1%} | "
                     f"{ops} |")
    if results.get("accuracy"):
        acc = results["accuracy"]
        lines += ["", f"### Accuracy of the trained L1 ({acc['checkpoint']}, {acc['img_size']} px), full Imagenette "
                  f"val ({acc['images']} images); int8 calibrated on {acc['calibration_images']} train images", "",
                  "| runtime precision | top-1 (%) | top-1 agreement with PyTorch fp32 (%) |", "|---|---:|---:|"]
        for key, row in acc["rows"].items():
            lines.append(f"| {key} | {row['top1']:.2f} | {row['agreement_with_fp32']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="batch-1 rounds per pass")
    parser.add_argument("--passes", type=int, default=3, help="interleaved batch-1 passes")
    parser.add_argument("--batch-repeats", type=int, default=3, help="batch-32 rounds")
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--calib-images", type=int, default=300, help="accuracy: calibration images (train split)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="the trained L1 for the accuracy part")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "docs" / "deployment_results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    flags = cpu_flags()
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags) and openvino_precision_supported("bf16")
    configs = [c for c in CONFIGS if c[1] != "bf16" or native_bf16]
    results: dict[str, Any] = {
        "machine": machine_info(), "threads": args.threads, "versions": versions(),
        "avx512": "avx512f" in flags, "native_bf16": native_bf16, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "skipped": "" if native_bf16 else "bf16 (this CPU has no native bf16: PyTorch would emulate it, OpenVINO "
                                          "silently runs fp32)",
        "loadavg": {"start": os.getloadavg()[0]},
    }
    calibration = load_images(list_images(DATA / "train", limit=32, seed=1), eval_transform({}, (224, 224)))
    runners, costs = build_runners([L1, *args.peers], configs, calibration, args.threads)
    x1 = torch.randn(1, 3, 224, 224).numpy()
    calls = {label(key): (lambda r=r: r(x1)) for key, r in runners.items()}
    results["loadavg"]["timing_start"] = os.getloadavg()[0]
    passes = [interleaved_timings(calls, args.repeats, 2, desc=f"batch 1, pass {i + 1}") for i in range(args.passes)]
    results["goals"] = [goals(p, configs) for p in passes]
    xb = torch.randn(32, 3, 224, 224).numpy()
    batch_runners = {label(k): r.for_batch(32) if isinstance(r, OpenVinoRunner) else r for k, r in runners.items()}
    batch = interleaved_timings({k: (lambda r=r: r(xb)) for k, r in batch_runners.items()}, args.batch_repeats, 1,
                                desc="batch 32")
    results["loadavg"]["timing_end"] = os.getloadavg()[0]
    last = passes[-1]
    table = []
    for key in runners:
        lab = label(key)
        peer = label(("efficientformer_l1", key[1], key[2]))
        table.append({"model": key[0], "runtime": key[1], "precision": key[2],
                      "gmacs": costs.get(key[0], costs[L1])[1], "b1_median_ms": last[lab].median_ms,
                      "b1_p90_ms": last[lab].p90_ms,
                      "b1_median_ms_per_pass": [p[lab].median_ms for p in passes],
                      "vs_release": last[lab].median_ms / last[label((RELEASE, "torch", "fp32"))].median_ms,
                      "vs_efficientformer_l1": last[lab].median_ms / last[peer].median_ms if peer in last else None,
                      "b32_images_per_s": 32e3 / batch[lab].median_ms})
    results["table"] = table
    del batch_runners
    results["profiles"] = profiles(runners, args.threads)
    del runners, calls
    if not args.skip_accuracy:
        if not args.checkpoint.exists():
            raise SystemExit(f"trained L1 checkpoint not found: {args.checkpoint} (pass --checkpoint or "
                             "--skip-accuracy)")
        results["accuracy"] = accuracy(args.checkpoint, args.calib_images, args.threads, configs)
    results["loadavg"]["end"] = os.getloadavg()[0]
    text = markdown(results)
    out = Path(args.output)
    atomic_report(results, text, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
