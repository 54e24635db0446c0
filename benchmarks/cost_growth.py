"""How the cost of forward cross attention grows with the input size (FcaFormer-L1 and L2).

For each model, input size (224, 384, 512) and mode (global attention, or the release's windowed mode with
14/7 windows) this builds the network with cross attention on and off (``cross_attention=False``: the same
network without cross tokens, LSFs, cross-token biases and merge convs), and measures

- MACs of the faithful path (``torch.utils.flop_counter``, MACs = FLOPs / 2; the faithful path includes the
  release's discarded query projection of the cross tokens, i.e. the release's cost);
- batch-1 latency of the fast path (median and p90; the four variants of one model and size are timed
  interleaved in one process).

Global-mode models are built with ``img_size`` equal to the input size, so their grids are native (no resized
tables). Writes ``docs/cost_growth.{json,md,png}``.

    python benchmarks/cost_growth.py [--threads 2] [--sizes 224 384 512]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import timm
import torch

import fcaformer  # noqa: F401  (registers the models)
from fcaformer.benchmark import interleaved_timings, machine_info, randomize_weights_
from fcaformer.fast import fuse_model, tune_cpu_allocator
from fcaformer.files import atomic_json_dump, atomic_write
from fcaformer.layers import conv_out_size
from fcaformer.profile import count_macs

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, size: int, windowed: bool, cross: bool) -> torch.nn.Module:
    kwargs = {"window_size": (14, 7)} if windowed else {"img_size": size}
    return randomize_weights_(timm.create_model(name, cross_attention=cross, **kwargs))


def plot(rows: list[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, color in (("fcaformer_l1", "tab:red"), ("fcaformer_l2", "tab:blue")):
        for mode, style in (("global", "-o"), ("windowed", "--s")):
            sel = [r for r in rows if r["model"] == name and r["mode"] == mode]
            tokens = [r["stage3_tokens"] for r in sel]
            label = f"{name[-2:].upper()} {mode}"
            axes[0].plot(tokens, [r["extra_gmacs"] for r in sel], style, color=color, label=label)
            axes[1].plot(tokens, [100 * r["extra_macs_frac"] for r in sel], style, color=color, label=label)
            axes[2].plot(tokens, [100 * r["extra_latency_frac"] for r in sel], style, color=color, label=label)
    axes[0].set_ylabel("extra GMACs from cross attention")
    axes[1].set_ylabel("extra MACs (% of the model without it)")
    axes[2].set_ylabel("extra latency, fast path, batch 1 (%)")
    for ax in axes:
        ax.set_xlabel("stage-3 tokens N (input 224 / 384 / 512)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcaformer_l1", "fcaformer_l2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8, help="latency rounds at 224 (fewer at larger sizes)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "cost_growth"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    allocator_tuned = tune_cpu_allocator()
    torch.manual_seed(0)
    info = {"machine": machine_info(), "loadavg_start": list(os.getloadavg()), "cpu_allocator_tuned": allocator_tuned}
    rows = []
    for name in args.models:
        for size in args.sizes:
            x = torch.randn(1, 3, size, size)
            variants = {(mode, cross): build(name, size, mode == "windowed", cross)
                        for mode in ("global", "windowed") for cross in (True, False)}
            macs = {key: count_macs(model, (1, 3, size, size)) for key, model in variants.items()}
            fused = {key: fuse_model(model) for key, model in variants.items()}
            repeats = max(3, round(args.repeats * (224 / size) ** 2))
            with torch.inference_mode():
                timings = interleaved_timings({f"{m}/{c}": (lambda f=f, x=x: f(x)) for (m, c), f in fused.items()},
                                              repeats, 2, desc=f"{name} @ {size}")
            grid = conv_out_size(size, 4)
            for mode in ("global", "windowed"):
                on, off = timings[f"{mode}/True"], timings[f"{mode}/False"]
                rows.append({
                    "model": name, "size": size, "mode": mode, "stage3_tokens": grid * grid,
                    "gmacs_on": macs[(mode, True)] / 1e9, "gmacs_off": macs[(mode, False)] / 1e9,
                    "extra_gmacs": (macs[(mode, True)] - macs[(mode, False)]) / 1e9,
                    "extra_macs_frac": macs[(mode, True)] / macs[(mode, False)] - 1,
                    "latency_on": vars(on), "latency_off": vars(off),
                    "extra_latency_frac": on.median_ms / off.median_ms - 1,
                })
    info["loadavg_end"] = list(os.getloadavg())

    machine = info["machine"]
    caption = (f"{machine['cpu']} ({machine['cpu_count']} cores), {args.threads} torch threads, fp32, "
               f"batch 1, {'tuned glibc allocator' if allocator_tuned else 'default allocator'}; "
               f"load average {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    lines = [
        f"Measured by `benchmarks/cost_growth.py` on {caption}.", "",
        "| model | input | mode | stage-3 tokens | GMACs off | GMACs on | extra GMACs | extra MACs | "
        "latency off (ms) | latency on (ms) | extra latency |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['mode']} | {r['stage3_tokens']} | {r['gmacs_off']:.3f} | "
            f"{r['gmacs_on']:.3f} | {r['extra_gmacs']:.3f} | {100 * r['extra_macs_frac']:+.1f}% | "
            f"{r['latency_off']['median_ms']:.0f} (p90 {r['latency_off']['p90_ms']:.0f}) | "
            f"{r['latency_on']['median_ms']:.0f} (p90 {r['latency_on']['p90_ms']:.0f}) | "
            f"{100 * r['extra_latency_frac']:+.0f}% |"
        )
    # growth exponent of the extra MACs between the smallest and largest size: extra ~ N^k
    lines += ["", "Growth of the extra MACs with the stage-3 token count N (fit of extra ~ N^k between the "
              "smallest and largest input):", ""]
    for name in args.models:
        for mode in ("global", "windowed"):
            sel = [r for r in rows if r["model"] == name and r["mode"] == mode]
            if len(sel) >= 2 and sel[0]["extra_gmacs"] > 0:
                k = math.log(sel[-1]["extra_gmacs"] / sel[0]["extra_gmacs"]) / math.log(
                    sel[-1]["stage3_tokens"] / sel[0]["stage3_tokens"])
                lines.append(f"- {name} {mode}: k = {k:.2f}")
    text = "\n".join(lines) + "\n"
    out = Path(args.output)
    atomic_json_dump({"info": info, "rows": rows}, out.with_suffix(".json"))
    atomic_write(out.parent / (out.name + "_table.md"), lambda h: h.write(text), binary=False)
    plot(rows, out.with_suffix(".png"), caption)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
