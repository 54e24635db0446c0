"""What :func:`fcaformer.fast.tune_cpu_allocator` buys: FcaFormer-L1 (fast path) with glibc's default vs tuned.

The allocator setting is process-wide, so each measurement is a fresh child process; children with and without
the tuning alternate (``--rounds`` of each) and the medians of their medians are reported, with the minor page
faults per forward. Writes ``docs/allocator.{json,md}``.

    python benchmarks/allocator.py [--rounds 5] [--batch 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from fcaformer.benchmark import machine_info
from fcaformer.files import atomic_json_dump, atomic_write

ROOT = Path(__file__).resolve().parents[1]

# One child: build L1 and its fused copy (randomised weights), warm up, time forwards, count page faults.
CHILD = """
import json, resource, statistics, sys, time
import timm, torch
from fcaformer.benchmark import randomize_weights_
from fcaformer.fast import fuse_model, tune_cpu_allocator

tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
torch.set_num_threads(int(sys.argv[2]))
# As a user would hold them: the model and its fused copy. (glibc's default behaviour depends on the heap's
# history: with other allocations before, the batch-1 faults can also vanish; larger batches fault regardless.)
original = randomize_weights_(timm.create_model("fcaformer_l1"))
model = fuse_model(original)
result = {"tuned": tuned}
with torch.inference_mode():
    for batch in map(int, sys.argv[3:]):
        x = torch.randn(batch, 3, 224, 224)
        for _ in range(3):
            model(x)
        repeats = max(3, 24 // batch)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
        result[batch] = {"median_ms": statistics.median(times), "faults_per_forward": faults}
print(json.dumps(result))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output", default=str(ROOT / "docs" / "allocator"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's real defaults
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for round_index in range(args.rounds):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.threads), *map(str, args.batch)],
                                 capture_output=True, text=True, check=True, env=env)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} {mode}: {runs[mode][-1]}", file=sys.stderr)
    summary = {
        mode: {str(b): {"median_ms": statistics.median(r[str(b)]["median_ms"] for r in rs),
                        "faults_per_forward": statistics.median(r[str(b)]["faults_per_forward"] for r in rs)}
               for b in args.batch}
        for mode, rs in runs.items()
    }
    machine = machine_info()
    lines = [f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {args.threads} torch threads, torch "
             f"{machine['torch']}; FcaFormer-L1 fast path, fp32, 224x224; {args.rounds} alternating child "
             "processes per setting, median of their medians.", "",
             "| batch | default (ms) | tuned (ms) | tuned / default | page faults per forward, default | tuned |",
             "|---:|---:|---:|---:|---:|---:|"]
    for b in map(str, args.batch):
        d, t = summary["default"][b], summary["tuned"][b]
        lines.append(f"| {b} | {d['median_ms']:.1f} | {t['median_ms']:.1f} | {t['median_ms'] / d['median_ms']:.2f} "
                     f"| {d['faults_per_forward']:.0f} | {t['faults_per_forward']:.0f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.output)
    atomic_json_dump({"machine": machine, "summary": summary, "runs": runs}, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), lambda h: h.write(text), binary=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
