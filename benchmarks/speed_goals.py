"""The fast path's speed goals for FcaFormer-L1 (issue: fast inference), measured in one process, interleaved.

Measures on this machine (default 2 torch threads, fp32, 224x224):
- batch-1 latency: faithful path, fast path (eager), fast path + torch.compile (inductor), ONNX Runtime, and
  timm's ``efficientformer_l1`` and ``deit_tiny_patch16_224`` (pretrained=False);
- batch-32 throughput: faithful vs fast;
- a training step (forward + backward + SGD step, batch 32, 160x160): faithful vs fast attention;
- bf16 (CPU autocast) latency next to fp32, and the bf16 outputs' difference from fp32;
- where the fast path's time goes (torch.profiler, top ops).

L1 uses the parameters of the release-layout parity fixture (all randomised away from init) when
``../shared/parity`` is present, else randomised weights. Writes ``docs/speed_goals.{json,md}``.

    python benchmarks/speed_goals.py [--threads 2] [--repeats 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import timm
import torch

import fcaformer
from fcaformer.benchmark import interleaved_timings, machine_info, randomize_weights_
from fcaformer.deploy import onnx_bytes, onnx_session, relative_error, run_onnx
from fcaformer.fast import fuse_model, set_fast_attention, tune_cpu_allocator
from fcaformer.files import atomic_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "parity" / "official_fcaformer_l1_cls.pt"


def load_l1() -> tuple[torch.nn.Module, str]:
    if FIXTURE.exists():
        data = torch.load(FIXTURE, weights_only=True)
        return fcaformer.load_official(data["state_dict"]), "release-layout parity fixture (randomised weights)"
    return randomize_weights_(timm.create_model("fcaformer_l1")), "randomised weights"


def profile_top_ops(model: torch.nn.Module, x: torch.Tensor, rows: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_forward": e.self_cpu_time_total / 5e3,
             "calls_per_forward": e.count / 5} for e in events[:rows]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-repeats", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compilation)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "speed_goals"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    allocator_tuned = tune_cpu_allocator()
    torch.manual_seed(0)
    results: dict = {"machine": machine_info(), "loadavg": {"start": list(os.getloadavg())},
                     "cpu_allocator_tuned": allocator_tuned}

    faithful, weights = load_l1()
    fast = fuse_model(faithful)
    results["weights"] = weights
    x1 = torch.randn(1, 3, 224, 224)
    peers = {name: timm.create_model(name, pretrained=False).eval()
             for name in ("efficientformer_l1", "deit_tiny_patch16_224")}
    candidates = {"faithful": faithful, "fast": fast, **peers}

    with torch.inference_mode():
        ref1 = faithful(x1)
    results["fast_rel_error"] = relative_error(fast(x1).detach(), ref1)
    session = onnx_session(onnx_bytes(fast, x1.expand(2, -1, -1, -1).contiguous()), threads=args.threads,
                           spin=False)
    results["onnx_rel_error"] = relative_error(run_onnx(session, x1)[0], ref1)

    calls = {name: (lambda m=m: m(x1)) for name, m in candidates.items()}
    calls["onnxruntime"] = lambda: run_onnx(session, x1)
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold the weights into the graph (inference only)
        compiled = torch.compile(fast)
        begin = time.perf_counter()
        with torch.inference_mode():
            out = compiled(x1)
        results["compile_seconds"] = time.perf_counter() - begin
        results["compiled_rel_error"] = relative_error(out, ref1)
        calls["fast+compile"] = lambda: compiled(x1)

    with torch.inference_mode():
        timings = interleaved_timings(calls, args.repeats, 3, desc="L1 batch 1")
        results["batch1_ms"] = {k: vars(v) for k, v in timings.items()}

        xb = torch.randn(32, 3, 224, 224)
        batch = interleaved_timings({"faithful": lambda: faithful(xb), "fast": lambda: fast(xb)},
                                    args.batch_repeats, 1, desc="L1 batch 32")
        results["batch32_images_per_s"] = {k: 32e3 / v.median_ms for k, v in batch.items()}
        results["batch32_ms"] = {k: vars(v) for k, v in batch.items()}

        # bf16 autocast next to fp32 (fast path)
        def bf16(m, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        precision = interleaved_timings({"fp32": lambda: fast(x1), "bf16": lambda: bf16(fast, x1)},
                                        args.repeats // 2, 2, desc="fp32 vs bf16")
        results["bf16_vs_fp32_batch1_ms"] = {k: vars(v) for k, v in precision.items()}
        precision32 = interleaved_timings({"fp32": lambda: fast(xb), "bf16": lambda: bf16(fast, xb)},
                                          args.batch_repeats, 1, desc="fp32 vs bf16, batch 32")
        results["bf16_vs_fp32_batch32_images_per_s"] = {k: 32e3 / v.median_ms for k, v in precision32.items()}
        xa = torch.randn(32, 3, 224, 224)
        ref = faithful(xa)
        out = bf16(fast, xa).float()
        results["bf16_accuracy"] = {
            "rel_error_vs_fp32": relative_error(out, ref),
            "top1_agreement_32_random_images": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        }

    # training step: forward + backward + SGD step, batch 32, 160x160, train mode (BN batch statistics)
    # (the trainer's defaults are fast attention on, channels-last off: `run.channels_last=true` adds it)
    train_models = {
        "faithful": copy.deepcopy(faithful).train(),
        "fast_attention": set_fast_attention(copy.deepcopy(faithful).train()),
        "fast_attention+channels_last": set_fast_attention(copy.deepcopy(faithful).train()).to(
            memory_format=torch.channels_last),
    }
    xt, yt = torch.randn(32, 3, 160, 160), torch.randint(0, 1000, (32,))
    inputs = {k: xt.contiguous(memory_format=torch.channels_last) if "channels_last" in k else xt
              for k in train_models}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in train_models.items()}

    def step(name: str) -> None:
        model, opt = train_models[name], optimizers[name]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs[name]), yt).backward()
        opt.step()

    train = interleaved_timings({k: (lambda k=k: step(k)) for k in train_models}, args.train_repeats, 1,
                                desc="train step b32@160")
    results["train_step_ms"] = {k: vars(v) for k, v in train.items()}
    results["profile_fast_batch1"] = profile_top_ops(fast, x1)
    results["profile_faithful_batch1"] = profile_top_ops(faithful, x1)
    results["loadavg"]["end"] = list(os.getloadavg())

    b1 = results["batch1_ms"]
    goals = [
        ("L1 b1 fast / faithful <= 0.5", b1["fast"]["median_ms"] / b1["faithful"]["median_ms"], 0.5, "<="),
        ("L1 b1 fast / efficientformer_l1 <= 1", b1["fast"]["median_ms"] / b1["efficientformer_l1"]["median_ms"],
         1.0, "<="),
        ("L1 b1 fast / deit_tiny <= 1", b1["fast"]["median_ms"] / b1["deit_tiny_patch16_224"]["median_ms"], 1.0,
         "<="),
        ("L1 b32 throughput fast / faithful >= 1.6",
         results["batch32_images_per_s"]["fast"] / results["batch32_images_per_s"]["faithful"], 1.6, ">="),
        ("train step b32@160 speed-up (fast attention) >= 1.2",
         results["train_step_ms"]["faithful"]["median_ms"] / results["train_step_ms"]["fast_attention"]["median_ms"],
         1.2, ">="),
        ("train step b32@160 speed-up (fast attention + channels-last) >= 1.2",
         results["train_step_ms"]["faithful"]["median_ms"]
         / results["train_step_ms"]["fast_attention+channels_last"]["median_ms"], 1.2, ">="),
    ]
    if "fast+compile" in b1:
        goals.insert(1, ("L1 b1 fast+compile / faithful <= 0.5",
                         b1["fast+compile"]["median_ms"] / b1["faithful"]["median_ms"], 0.5, "<="))
        goals.append(("torch.compile speed-up over eager fast path (b1)",
                      b1["fast"]["median_ms"] / b1["fast+compile"]["median_ms"], None, ""))
    results["goals"] = [{"goal": g, "measured": v, "target": t,
                         "met": None if t is None else (v <= t if op == "<=" else v >= t)} for g, v, t, op in goals]

    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {args.threads} torch "
        f"threads, torch {machine['torch']}, fp32 unless noted, "
        f"{'glibc allocator tuned (tune_cpu_allocator)' if allocator_tuned else 'default allocator'}. "
        f"Load average (1 min) "
        f"{results['loadavg']['start'][0]:.2f} at start, {results['loadavg']['end'][0]:.2f} at end. "
        f"L1 weights: {weights}.",
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for g in results["goals"]:
        target = "-" if g["target"] is None else f"{g['target']:.2f}"
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['measured']:.2f} | {target} | {met} |")
    lines += ["", "| L1, batch 1, 224 | median (ms) | p90 (ms) | min (ms) |", "|---|---:|---:|---:|"]
    for k, v in b1.items():
        lines.append(f"| {k} | {v['median_ms']:.1f} | {v['p90_ms']:.1f} | {v['min_ms']:.1f} |")
    lines += ["", "| L1, batch 32, 224 | median (ms) | images/s |", "|---|---:|---:|"]
    for k, v in results["batch32_ms"].items():
        lines.append(f"| {k} | {v['median_ms']:.0f} | {results['batch32_images_per_s'][k]:.1f} |")
    lines += ["", "| training step, batch 32, 160 | median (ms) | p90 (ms) |", "|---|---:|---:|"]
    for k, v in results["train_step_ms"].items():
        lines.append(f"| {k} | {v['median_ms']:.0f} | {v['p90_ms']:.0f} |")
    p = results["bf16_vs_fp32_batch1_ms"]
    acc = results["bf16_accuracy"]
    lines += ["", f"bf16 autocast (fast path, batch 1): {p['bf16']['median_ms']:.1f} ms vs fp32 "
              f"{p['fp32']['median_ms']:.1f} ms (medians, interleaved); batch 32: "
              f"{results['bf16_vs_fp32_batch32_images_per_s']['bf16']:.1f} vs "
              f"{results['bf16_vs_fp32_batch32_images_per_s']['fp32']:.1f} images/s; outputs vs fp32: relative error "
              f"{acc['rel_error_vs_fp32']:.2e}, top-1 agreement {acc['top1_agreement_32_random_images']:.2%} "
              "on 32 random images.",
              f"Relative error vs the faithful path: fast {results['fast_rel_error']:.1e}, ONNX Runtime "
              f"{results['onnx_rel_error']:.1e}"
              + (f", compiled {results['compiled_rel_error']:.1e} (compile took {results['compile_seconds']:.0f} s)"
                 if "compiled_rel_error" in results else "") + ".",
              "", "Where the fast path's batch-1 time goes (torch.profiler, self CPU time):", "",
              "| op | share | ms / forward | calls / forward |", "|---|---:|---:|---:|"]
    for row in results["profile_fast_batch1"]:
        lines.append(f"| {row['op']} | {row['share']:.1%} | {row['ms_per_forward']:.2f} | "
                     f"{row['calls_per_forward']:.0f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.output)
    atomic_report(results, text, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
