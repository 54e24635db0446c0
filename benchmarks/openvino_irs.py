"""Batch-1 latency of exported OpenVINO models, compared in one process: e.g. what ``--min-agreement`` costs.

    python benchmarks/openvino_irs.py fp32.xml int8.xml int8_min_agreement.xml -o docs/int8_min_agreement_latency

Each IR is compiled for the CPU in latency mode (``fcaformer.deploy.OpenVinoRunner``), then timed round-robin,
interleaved, after a warm-up (``fcaformer.benchmark.interleaved_timings``): medians, p90 and the ratio to the first
IR, with the machine named (CPU model and its int8/bf16 features). It also counts what stayed in full precision:
the matrix products and convolutions whose inputs are not quantized. Benchmark only when nothing else runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fcaformer.benchmark import interleaved_timings, machine_info
from fcaformer.deploy import OpenVinoRunner
from fcaformer.errors import require
from fcaformer.files import atomic_report

WEIGHTED_OPS = ("MatMul", "Convolution", "GroupConvolution")


def precision_census(model: Any) -> dict[str, int]:
    """``FakeQuantize`` nodes, and the matrix products / convolutions with and without a quantized input."""
    quantized = full = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        producers = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        # NNCF puts a FakeQuantize (possibly behind a Convert of int8 weights) in front of each quantized input
        if any(p.get_type_name() == "FakeQuantize" or (p.get_type_name() == "Convert" and p.input_value(0)
               .get_node().get_type_name() == "FakeQuantize") for p in producers):
            quantized += 1
        else:
            full += 1
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    return {"fake_quantize": fake_quantize, "weighted_ops_quantized": quantized, "weighted_ops_full": full}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("irs", nargs="+", type=Path, help="OpenVINO .xml files (the first is the reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--output", "-o", type=Path, help="write <output>.md and <output>.json")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.irs if not path.is_file()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    ov = require("openvino")
    models = {path.name: ov.Core().read_model(str(path)) for path in args.irs}
    runners, feeds = {}, {}
    for name, model in models.items():
        shape = [1, *(d.get_length() for d in list(model.inputs[0].get_partial_shape())[1:])]
        runners[name] = OpenVinoRunner(model, args.threads, batch_size=1)
        feeds[name] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    timings = interleaved_timings({name: (lambda n=name: runners[n](feeds[n])) for name in runners},
                                  repeats=args.repeats, warmup=args.warmup, desc="OpenVINO IRs")
    reference = timings[args.irs[0].name].median_ms
    rows = [{"ir": name, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "ratio": t.median_ms / reference,
             **precision_census(models[name])} for name, t in timings.items()]
    machine = machine_info()
    lines = [f"Machine: {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no AVX-512/VNNI/AMX'}), "
             f"{args.threads} threads, batch 1, {args.repeats} interleaved rounds after {args.warmup} warm-up; load "
             f"average at the end {machine['loadavg'][0]:.2f}.", "",
             "| IR | median (ms) | p90 (ms) | × first | FakeQuantize | MatMul/Conv quantized | MatMul/Conv in full "
             "precision |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ir']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['ratio']:.2f} | {r['fake_quantize']} | "
              f"{r['weighted_ops_quantized']} | {r['weighted_ops_full']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        atomic_report({"machine": machine, "threads": args.threads, "repeats": args.repeats, "rows": rows}, text,
                      args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
