"""The README's model-zoo table: ``fcaformer benchmark`` over the zoo (fast path) and the timm peers.

Writes ``docs/benchmarks_zoo.{md,json,png}`` (latency vs MACs chart). Same as

    fcaformer benchmark --repeats 10 --throughput-repeats 3 --onnx fcaformer_l0 fcaformer_l1 fcaformer_l2 \
        -o docs/benchmarks_zoo

Re-draw the table and chart from the stored JSON without measuring:
``fcaformer benchmark --replot docs/benchmarks_zoo.json -o docs/benchmarks_zoo``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fcaformer.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(["benchmark", "--repeats", "10", "--throughput-repeats", "3", "--onnx", "fcaformer_l0",
                   "fcaformer_l1", "fcaformer_l2", "-o", str(ROOT / "docs" / "benchmarks_zoo"), *sys.argv[1:]]))
