"""GPU benchmark: FcaFormer L1-L4 (fast path and faithful path) against timm peers on one CUDA GPU.

Every model is measured in one process, interleaved (round-robin over the models, several rounds, medians),
timed with CUDA events after a warm-up, at 224x224 with channels-last activations:

- inference throughput at batch 256 under fp16 and bf16 autocast, eager, and under ``torch.compile`` for the
  models named by ``--compile``;
- batch-1 latency (fp16 autocast, eager);
- training throughput: bf16 autocast, batch 128, forward + backward + fused AdamW step, and the memory a
  model's training needs (its weights plus the peak of what its steps allocate: activations, gradients, AdamW
  state).

Phases run most important first (fp16 inference, training, bf16 inference, latency, kernel profile, compile)
and the three files are rewritten after each, so a run stopped by a time limit keeps what it measured; every
number is also printed as it is measured.

FcaFormer rows: ``fcaformer_lN`` is the fused fast path (``fuse_model`` for inference; for training
``set_fast_attention``: no unused cross-token query, attention computed explicitly while the bias needs a
gradient), ``fcaformer_lN (sdpa)`` trains with SDPA's memory-efficient kernel also differentiating the bias,
``fcaformer_lN (faithful)`` computes what the authors' release computes. Also writes a CUDA-kernel profile of
L1's fast and faithful inference. Outputs in ``--out``: ``gpu.json``, ``gpu.md``, ``gpu.png``.

    python benchmarks/gpu.py --out runs/gpu                      # on a GPU machine (~3 minutes on an H100)
    python benchmarks/gpu.py --device cpu --quick --out /tmp/g   # the dry run of the test suite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import fcaformer
from fcaformer.benchmark import machine_info, model_cost
from fcaformer.fast import fuse_model, set_fast_attention
from fcaformer.files import atomic_json_dump, atomic_write

FCAFORMER = ("fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4")
PEERS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "efficientformer_l1", "efficientformer_l3",
         "levit_256", "levit_384", "convnext_tiny", "swin_tiny_patch4_window7_224", "repvit_m1_1", "fastvit_sa12")
SDPA_TRAINING = ("fcaformer_l1", "fcaformer_l2")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclass
class Settings:
    """Sizes and repetitions (``quick``: the CPU dry run's tiny ones)."""

    device: torch.device
    img_size: int = 224
    infer_batch: int = 256
    train_batch: int = 128
    rounds: int = 4
    iters: int = 4
    warmup: int = 3
    fca: tuple[str, ...] = FCAFORMER
    peers: tuple[str, ...] = PEERS
    compile: tuple[str, ...] = ("fcaformer_l1", "fcaformer_l1 (faithful)")
    # autocast dtypes (None: fp32); half precision is what a GPU runs, the CPU dry run keeps fp32
    infer_dtypes: tuple[str, ...] = ("fp16", "bf16")
    latency_dtype: str = "fp16"
    train_dtype: str = "bf16"
    budget_s: float = 420.0
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    @classmethod
    def quick(cls, device: torch.device) -> Settings:
        return cls(device, img_size=64, infer_batch=4, train_batch=4, rounds=2, iters=1, warmup=1,
                   fca=("fcaformer_l1",), peers=("deit_tiny_patch16_224",), compile=(), infer_dtypes=("fp32",),
                   latency_dtype="fp32", train_dtype="fp32")


# ------------------------------------------------------------------------------------------------ models
def build(row: str, settings: Settings) -> nn.Module:
    """The network of a row label (``name``, ``name (faithful)``, ``name (sdpa)``) on the device, eval mode."""
    name = row.split(" ")[0]
    kwargs: dict[str, Any] = {"img_size": settings.img_size} if settings.img_size != 224 else {}
    model = timm.create_model(name, **kwargs)
    return model.to(settings.device).to(memory_format=torch.channels_last).eval()


def inference_model(row: str, settings: Settings) -> nn.Module:
    model = build(row, settings)
    return fuse_model(model) if row.startswith("fcaformer") and " " not in row else model


def training_model(row: str, settings: Settings) -> nn.Module:
    model = build(row, settings).train()
    if row.startswith("fcaformer") and "faithful" not in row:
        set_fast_attention(model, sdpa_bias_grad=row.endswith("(sdpa)"))
    return model


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls (CUDA events on a GPU, wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) / iters


def interleaved(candidates: dict[str, Callable[[], Any]], settings: Settings, iters: int | None = None,
                warmup: int | None = None) -> dict[str, float]:
    """Median seconds per call of each candidate: warm-up, then rounds of ``iters`` calls each, rotating order."""
    iters = iters or settings.iters
    names = list(candidates)
    for name in names:
        for _ in range(settings.warmup if warmup is None else warmup):
            candidates[name]()
    synchronize(settings.device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(settings.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_iterations(candidates[name], iters, settings.device))
    return {name: statistics.median(values) for name, values in samples.items()}


def inference_fn(model: nn.Module, batch: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad(), torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            return model(batch)

    return run


def train_fn(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None
             ) -> Callable[[], None]:
    fused = batch.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)

    def step() -> None:
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def images(batch: int, settings: Settings) -> torch.Tensor:
    x = torch.randn(batch, 3, settings.img_size, settings.img_size, device=settings.device)
    return x.contiguous(memory_format=torch.channels_last)


def warm_up_with_peak(step: Callable[[], None], model: nn.Module, settings: Settings) -> float:
    """Run the warm-up steps of one model; return the MiB it needs to train: its weights plus the peak of what its
    steps allocate (activations, gradients, AdamW state). ``nan`` off CUDA."""
    cuda = settings.device.type == "cuda"
    if cuda:
        synchronize(settings.device)
        torch.cuda.reset_peak_memory_stats(settings.device)
        base = torch.cuda.memory_allocated(settings.device)
    for _ in range(settings.warmup):
        step()
    if not cuda:
        return float("nan")
    synchronize(settings.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (torch.cuda.max_memory_allocated(settings.device) - base + weights) / 2**20


# ------------------------------------------------------------------------------------------------ phases
class Benchmark:
    """The measurements, phase by phase, most important first; ``save`` runs after each phase, so a run stopped
    early keeps what it measured."""

    def __init__(self, settings: Settings, log: Callable[[str], None], save: Callable[[Benchmark], None]) -> None:
        self.settings, self.log, self.save = settings, log, save
        self.rows: dict[str, dict[str, Any]] = {}
        self.profile: dict[str, list[dict[str, Any]]] = {}
        self.fca_rows = [r for name in settings.fca for r in (name, f"{name} (faithful)")]
        self.infer_rows = self.fca_rows + list(settings.peers)

    def row(self, label: str) -> dict[str, Any]:
        return self.rows.setdefault(label, {})

    def run(self) -> None:
        s = self.settings
        phases = [self.costs, lambda: self.inference(s.infer_dtypes[0]), self.training,
                  *[(lambda label=label: self.inference(label)) for label in s.infer_dtypes[1:]],
                  self.latency, self.kernels, self.compiled]
        for phase in phases:
            phase()
            self.save(self)

    def costs(self) -> None:
        for name in [*self.settings.fca, *self.settings.peers]:
            params_m, gmacs = model_cost(build(name, self.settings), self.settings.img_size)
            labels = [name, f"{name} (faithful)"] if name in self.settings.fca else [name]
            if name in SDPA_TRAINING and name in self.settings.fca and self.settings.device.type == "cuda":
                labels.append(f"{name} (sdpa)")
            for label in labels:
                self.row(label).update(params_m=params_m, gmacs=gmacs)

    def _inference_models(self) -> dict[str, nn.Module]:
        return {row: inference_model(row, self.settings) for row in self.infer_rows}

    def inference(self, label: str) -> None:
        s = self.settings
        self.log(f"inference {label}, batch {s.infer_batch}")
        batch = images(s.infer_batch, s)
        models = self._inference_models()
        times = interleaved({row: inference_fn(m, batch, DTYPES[label]) for row, m in models.items()}, s)
        for row, seconds in times.items():
            self.row(row)[f"infer_{label}_img_s"] = s.infer_batch / seconds
            self.log(f"  {row}: {s.infer_batch / seconds:.0f} img/s")
        self._free()

    def latency(self) -> None:
        s = self.settings
        self.log(f"latency, batch 1, {s.latency_dtype}")
        one = images(1, s)
        models = self._inference_models()
        times = interleaved({row: inference_fn(m, one, DTYPES[s.latency_dtype]) for row, m in models.items()},
                            s, iters=1)
        for row, seconds in times.items():
            self.row(row)["latency_b1_ms"] = seconds * 1e3
            self.log(f"  {row}: {seconds * 1e3:.2f} ms")
        self._free()

    def training(self) -> None:
        s = self.settings
        self.log(f"training {s.train_dtype}, batch {s.train_batch}, all models resident")
        rows = self.fca_rows + [f"{n} (sdpa)" for n in s.fca if n in SDPA_TRAINING and s.device.type == "cuda"]
        rows += list(s.peers)
        labels = torch.zeros(s.train_batch, dtype=torch.long, device=s.device)
        batch = images(s.train_batch, s)
        steps = {}
        for row in rows:  # built and warmed up one after the other: the warm-up also measures the memory
            model = training_model(row, s)
            steps[row] = train_fn(model, batch, labels, DTYPES[s.train_dtype])
            self.row(row)["train_peak_mib"] = warm_up_with_peak(steps[row], model, s)
        for row, seconds in interleaved(steps, s, warmup=0).items():
            self.row(row)["train_img_s"] = s.train_batch / seconds
            self.log(f"  {row}: {s.train_batch / seconds:.0f} img/s, {self.rows[row]['train_peak_mib']:.0f} MiB")
        del steps
        self._free()

    def kernels(self) -> None:
        if self.settings.fca:
            models = {row: inference_model(row, self.settings) for row in self.fca_rows[:2]}
            self.profile = kernel_profile(models, images(self.settings.infer_batch, self.settings), self.settings)
            self._free()

    def compiled(self) -> None:
        """fp16 batch-256 throughput of the ``settings.compile`` rows under ``torch.compile`` (and compile time)."""
        s = self.settings
        batch = images(s.infer_batch, s)
        runs = {}
        for row in s.compile:
            if s.left() < 60:
                self.log(f"skipping torch.compile of {row}: {s.left():.0f} s of the budget left")
                continue
            self.log(f"torch.compile {row}")
            begin = time.perf_counter()
            run = inference_fn(torch.compile(inference_model(row, s)), batch, DTYPES[s.infer_dtypes[0]])
            run()
            synchronize(s.device)
            self.row(row)["compile_s"] = time.perf_counter() - begin
            runs[row] = run
        if runs:
            for row, seconds in interleaved(runs, s).items():
                self.row(row)["infer_fp16_compiled_img_s"] = s.infer_batch / seconds
                self.log(f"  {row} compiled: {s.infer_batch / seconds:.0f} img/s")

    def _free(self) -> None:
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()


def kernel_profile(models: dict[str, nn.Module], batch: torch.Tensor, settings: Settings, top: int = 12
                   ) -> dict[str, list[dict[str, Any]]]:
    """The most expensive device kernels of L1's fast and faithful fp16 inference (3 batches each)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if settings.device.type == "cuda" else ProfilerActivity.CPU
    dtype = DTYPES[settings.infer_dtypes[0]]
    name = settings.fca[0]
    result = {}
    for row in (name, f"{name} (faithful)"):
        run = inference_fn(models[row], batch, dtype)
        with profile(activities=[activity]) as prof:
            for _ in range(3):
                run()
            synchronize(settings.device)
        key = "device_time_total" if activity == ProfilerActivity.CUDA else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1.0
        result[row] = [{"kernel": e.key[:90], "share": getattr(e, key) / total, "calls": e.count // 3}
                       for e in events[:top]]
    return result


# ------------------------------------------------------------------------------------------------ report
COLUMNS = [("params_m", "params (M)", ".2f"), ("gmacs", "GMACs", ".2f"),
           ("infer_fp16_img_s", "fp16 b256 img/s", ".0f"), ("infer_bf16_img_s", "bf16 b256 img/s", ".0f"),
           ("infer_fp16_compiled_img_s", "fp16 b256 compiled img/s", ".0f"),
           ("latency_b1_ms", "b1 latency (ms)", ".2f"),
           ("train_img_s", "train bf16 b128 img/s", ".0f"), ("train_peak_mib", "train peak (MiB)", ".0f")]


def markdown(result: dict[str, Any]) -> str:
    card = result["machine"]["card"]
    lines = [f"# GPU benchmark on {card}", "",
             f"{card}; torch {result['machine']['torch']}, timm {result['machine']['timm']}; "
             f"{result['settings']['img_size']}x{result['settings']['img_size']}, channels-last; medians of "
             f"{result['settings']['rounds']} interleaved rounds "
             f"({'CUDA events' if result['machine']['gpu'] else 'wall clock'}).", ""]
    header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines += [f"**All models, {card}**", "", header, "|---|" + "---:|" * len(COLUMNS)]
    for row, values in result["rows"].items():
        cells = [format(values[key], spec) if isinstance(values.get(key), float) else "-" for key, _, spec in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"**Goals (fast / faithful), {card}**", "", "| goal | model | measured | target |",
              "|---|---|---:|---:|"]
    for goal in result["goals"]:
        lines.append(f"| {goal['goal']} | {goal['model']} | {goal['ratio']:.2f}x | {goal['target']} |")
    for row, kernels in result["profile"].items():
        lines += ["", f"**Top kernels, {row}, {result['settings']['infer_dtypes'][0]} inference, {card}**", "",
                  "| kernel | share | calls/batch |",
                  "|---|---:|---:|"]
        lines += [f"| `{k['kernel']}` | {100 * k['share']:.1f} % | {k['calls']} |" for k in kernels]
    return "\n".join(lines) + "\n"


def goals(rows: dict[str, dict[str, Any]], fca: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for name in fca:
        fast, slow = rows.get(name, {}), rows.get(f"{name} (faithful)", {})
        sdpa = rows.get(f"{name} (sdpa)", {})
        checks = [("fp16 b256 inference throughput", fast, slow, "infer_fp16_img_s", ">= 1.5x"),
                  ("bf16 b128 training throughput", fast, slow, "train_img_s", ">= 1.3x"),
                  ("training peak memory", fast, slow, "train_peak_mib", "<= 0.8x"),
                  ("bf16 b128 training throughput (sdpa)", sdpa, slow, "train_img_s", ">= 1.3x"),
                  ("training peak memory (sdpa)", sdpa, slow, "train_peak_mib", "<= 0.8x")]
        for goal, a, b, key, target in checks:
            if isinstance(a.get(key), float) and isinstance(b.get(key), float) and b[key] == b[key] and b[key]:
                out.append({"goal": goal, "model": name, "ratio": a[key] / b[key], "target": target})
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    from fcaformer.files import pyplot, save_figure

    plt = pyplot()

    rows = result["rows"]
    panels = [("infer_fp16_img_s", "inference fp16, batch 256 (img/s)"),
              ("train_img_s", "training bf16, batch 128 (img/s)")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.5))
    for ax, (key, title) in zip(axes, panels):
        names = [r for r in rows if isinstance(rows[r].get(key), float)]
        names.sort(key=lambda r: rows[r][key])
        colors = ["C3" if r.startswith("fcaformer") and " " not in r else "C1" if r.startswith("fcaformer")
                  else "C0" for r in names]
        ax.barh(range(len(names)), [rows[r][key] for r in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{result['machine']['card']}: FcaFormer fast path (red), faithful / sdpa (orange), timm peers")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md, gpu.png")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two models: a dry run of the code")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip torch.compile when this is spent")
    parser.add_argument("--compile", nargs="*", help="rows to torch.compile (default: L1 fast and faithful)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 2
    settings = Settings.quick(device) if args.quick else Settings(device)
    settings.budget_s = args.budget_s
    if args.compile is not None:
        settings.compile = tuple(args.compile)
    torch.backends.cudnn.benchmark = True
    log = lambda message: print(f"[{time.perf_counter() - settings.start:6.1f} s] {message}", flush=True)
    info = machine_info()
    card = info["gpu"] or f"CPU ({info['cpu']})"
    result = {"machine": {**info, "card": card, "timm": timm.__version__, "fcaformer": fcaformer.__version__,
                          "cuda": torch.version.cuda},
              "settings": {k: (v if isinstance(v, (int, float, tuple)) else str(v))
                           for k, v in vars(settings).items() if k != "start"}}

    def save(bench: Benchmark) -> None:
        result.update(rows=bench.rows, profile=bench.profile)
        write(result, settings, args.out, log)

    Benchmark(settings, log, save).run()
    print(markdown(result))
    return 0


def write(result: dict[str, Any], settings: Settings, out: Path, log: Callable[[str], None]) -> None:
    result["goals"] = goals(result["rows"], settings.fca)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json_dump(result, out / "gpu.json")
    atomic_write(out / "gpu.md", lambda h: h.write(markdown(result)), binary=False)
    plot(result, out / "gpu.png")


if __name__ == "__main__":
    sys.exit(main())
