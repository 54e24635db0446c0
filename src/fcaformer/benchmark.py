"""Benchmark harness: interleaved latency (median, p90), throughput, activation memory, params and MACs.

Every candidate is measured in one process, round-robin (one call of each per round, after a warm-up of each),
so that a load change on a shared machine hits all candidates alike. Reports carry ``os.getloadavg()`` taken
before and after, the thread count and the machine, because absolute numbers on a shared CPU are noisy; the
ratios between interleaved candidates are the robust part.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from . import models as _registry  # noqa: F401  (registers the FcaFormer zoo with timm)
from .deploy import (
    OpenVinoRunner,
    TorchRunner,
    build_runner,
    check_precision,
    layout_share,
    onnx_bytes,
    onnx_session,
    run_onnx,
)
from .files import atomic_write
from .profile import count_macs, count_params

TIMM_PEERS: tuple[str, ...] = (
    "deit_tiny_patch16_224",
    "efficientformer_l1",
    "levit_256",
    "convnext_femto",
    "convnext_nano",
    "convnext_tiny",
    "swin_tiny_patch4_window7_224",
    "repvit_m1_1",
    "fastvit_sa12",
    "efficientvit_b1",
)
"""timm models the zoo is compared with (created with ``pretrained=False``: no downloads)."""


@dataclass
class Timing:
    """Summary of repeated wall-clock measurements, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    samples: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            raise ValueError("no timing samples")
        ms = sorted(s * 1e3 for s in samples)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        return cls(statistics.median(ms), p90, ms[0], len(ms))


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
"""CPU features that change what int8 and bf16 gain (/proc/cpuinfo names); benchmarks record which are present."""


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (CPU model and its int8/bf16 features, cores, torch threads, load
    average)."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        present = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        flags = [flag for flag in SPEED_FLAGS if flag in present]
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg": list(os.getloadavg()),
    }
    return info


def interleaved_timings(
    candidates: dict[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    desc: str = "timing",
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, round-robin, after ``warmup`` calls of each.

    The order within a round rotates so no candidate always runs right after the same other one.
    ``min_seconds`` keeps adding rounds (beyond ``repeats``) until that much time has passed.
    """
    if not candidates:
        raise ValueError("no candidates to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(candidates)
    with tqdm(total=warmup * len(names), desc=f"{desc} (warm-up)", leave=False) as bar:
        for _ in range(warmup):
            for name in names:
                candidates[name]()
                bar.update()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    with tqdm(total=repeats, desc=desc, unit="round", leave=False) as bar:
        round_index = 0
        while round_index < repeats or time.perf_counter() - start < min_seconds:
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                begin = time.perf_counter()
                candidates[name]()
                samples[name].append(time.perf_counter() - begin)
            round_index += 1
            bar.update()
    return {name: Timing.from_seconds(values) for name, values in samples.items()}


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensors created by ops while they are alive (peak = activation memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:
                continue  # a view or an in-place result: its storage is already counted
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key, nbytes)
        return out


def peak_activation_mib(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak memory of the tensors ``fn`` creates (weights excluded), in MiB.

    On CUDA this is ``max_memory_allocated`` above the starting allocation; on CPU the tensors created by
    each op are tracked until they are freed (an estimate: allocator overheads and library scratch space are
    not seen).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _LiveTensorBytes() as tracker:
        result = fn()
        del result
    return tracker.peak / 2**20


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a freshly initialised FcaFormer trained-like parameter magnitudes (layer scales near 1, biases,
    relative-position tables, LSFs and BN statistics away from their init), in place; returns it in eval mode.

    Fresh init (layer scales 1e-6) makes outputs nearly input-independent and tiny, which hides every branch
    from accuracy comparisons and can produce denormal floats that distort CPU timings.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param)
        if name.endswith(("gamma", "cross_scale")) or ("norm" in name and name.endswith("weight")):
            param.copy_(1 + 0.3 * noise)
        elif name.endswith(("rel_pos_table", "cross_bias")):
            param.copy_(noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            param.add_(0.01 * noise)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen).to(buf))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen).to(buf))
    return model.eval()


@dataclass
class ModelRow:
    """One model's line in the zoo table."""

    name: str
    params_m: float
    gmacs: float
    latency: Timing | None = None
    throughput_ips: float | None = None
    throughput_batch: int | None = None
    activation_mib: float | None = None
    onnxruntime: Timing | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRow:
        """The inverse of :meth:`to_dict` (e.g. to re-plot a stored benchmark)."""
        timings = {k: Timing(**data[k]) if data.get(k) else None for k in ("latency", "onnxruntime")}
        return cls(**{**data, **timings})


def model_cost(model: nn.Module, img_size: int) -> tuple[float, float]:
    """(params in M, GMACs at batch 1) of an eval-mode model; MACs = FLOPs / 2 (``torch.utils.flop_counter``)."""
    return count_params(model) / 1e6, count_macs(model, (1, 3, img_size, img_size)) / 1e9


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[ModelRow], baseline: str | None = None) -> str:
    """The zoo table as markdown; ``baseline`` adds a latency-ratio column relative to that row."""
    base = next((r for r in rows if r.name == baseline and r.latency), None)
    header = ["model", "params (M)", "GMACs", "latency b1 median (ms)", "p90 (ms)", "min (ms)"]
    if base:
        header.append(f"vs {baseline}")
    header += ["ONNX Runtime b1 (ms)", "throughput (img/s)", "activations (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [r.name, f"{r.params_m:.2f}", f"{r.gmacs:.3f}", _cell(r.latency and r.latency.median_ms, ".1f"),
                 _cell(r.latency and r.latency.p90_ms, ".1f"), _cell(r.latency and r.latency.min_ms, ".1f")]
        if base:
            cells.append(_cell(r.latency and r.latency.median_ms / base.latency.median_ms, ".2f") + "x")
        throughput = None if r.throughput_ips is None else f"{r.throughput_ips:.1f} (b{r.throughput_batch})"
        cells += [_cell(r.onnxruntime and r.onnxruntime.median_ms, ".1f"), throughput or "-",
                  _cell(r.activation_mib, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_vs_macs_plot(rows: Sequence[ModelRow], path: str | os.PathLike, title: str) -> None:
    """PNG of batch-1 latency (and, when measured, throughput) against GMACs, log-log, written atomically.

    Accuracy is not measurable here, so MACs stand in on the x axis. Log axes keep the many ~1 GMAC models apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.latency is not None]
    panels = [("latency, batch 1, median (ms)", lambda r: r.latency.median_ms)]
    if any(r.throughput_ips for r in timed):
        panels.append(("throughput (images/s)", lambda r: r.throughput_ips))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    for ax, (label, value) in zip(axes[0], panels):
        points = [(r.name, r.gmacs, value(r)) for r in timed if value(r)]
        for name, x, y in points:
            ours = name.startswith("fcaformer")
            ax.scatter(x, y, s=50, marker="o" if ours else "s", color="tab:red" if ours else "tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5 x 10^k, written as plain numbers
            axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("GMACs (batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        _annotate_apart(fig, ax, points)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)


def _annotate_apart(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]], fontsize: int = 7) -> None:
    """Label each point, pushing a label up (in points) until it no longer overlaps one placed before."""
    fig.canvas.draw()  # fixes the data -> pixel transform
    to_pixels, scale = ax.transData.transform, fig.dpi / 72
    placed: list[tuple[float, float, float, float]] = []
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = to_pixels((x, y))
        width, height = 0.6 * fontsize * len(name) * scale, 1.2 * fontsize * scale
        offset = 3.0
        while any(px < right and left < px + width and py + offset * scale < top and bottom < py + offset * scale
                  + height for left, bottom, right, top in placed):
            offset += 2.0
        placed.append((px, py + offset * scale, px + width, py + offset * scale + height))
        ax.annotate(name, (x, y), fontsize=fontsize, xytext=(4, offset), textcoords="offset points",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if offset > 6 else None)


def _build(name: str, img_size: int) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False)
    if name.startswith("fcaformer"):
        randomize_weights_(model)
    return model.eval()


def run_zoo(
    models: Sequence[str],
    peers: Sequence[str] = TIMM_PEERS,
    img_size: int = 224,
    repeats: int = 20,
    warmup: int = 3,
    throughput_batch: int = 32,
    throughput_repeats: int = 3,
    onnx_models: Sequence[str] = (),
    faithful_baseline: str | None = "fcaformer_l1",
    runtime: str = "torch",
    precision: str = "fp32",
    calibration: torch.Tensor | None = None,
    profile: bool = False,
) -> tuple[list[ModelRow], dict[str, Any]]:
    """Benchmark FcaFormer models and timm peers in one process, interleaved, all under one runtime and precision.

    Args:
        models: FcaFormer model names (PyTorch: the fused fast path; ONNX Runtime / OpenVINO: the lean graph of
            the hybrids, the fused path of L0; see :func:`fcaformer.deploy.inference_graph`).
        peers: timm model names (``pretrained=False``), measured as timm builds them; those that provide a
            ``reparameterize`` / ``fuse`` (RepViT, FastViT, ...) are reparameterized first, like ours.
        img_size: square input size.
        repeats, warmup: batch-1 latency rounds.
        throughput_batch, throughput_repeats: batch size and rounds of the throughput pass (0: skip).
        onnx_models: PyTorch runtime only: FcaFormer names also exported to ONNX and timed in ONNX Runtime.
        faithful_baseline: also time this model's faithful (unfused) path in PyTorch fp32 (the release's
            computation, whatever the runtime), as ``<name> (faithful)``.
        runtime, precision: ``torch`` / ``onnxruntime`` / ``openvino`` and ``fp32`` / ``bf16`` / ``int8`` (see
            :data:`fcaformer.deploy.SUPPORTED`).
        calibration: ``(N, 3, img_size, img_size)`` images for int8 (real images calibrate best; for latency
            alone any data will do).
        profile: also record each model's per-op profile (batch 1) in ``row.extra["profile"]``.

    Returns:
        the rows and a dict of run information (machine, load averages, settings).
    """


    check_precision(runtime, precision)
    threads = torch.get_num_threads()
    info: dict[str, Any] = {"machine": machine_info(), "img_size": img_size, "repeats": repeats,
                            "warmup": warmup, "throughput_batch": throughput_batch, "runtime": runtime,
                            "precision": precision}
    rows: dict[str, ModelRow] = {}
    runners: dict[str, Any] = {}
    for name in tqdm([*models, *peers], desc=f"building models ({runtime} {precision})", leave=False):
        model = _build(name, img_size)
        params, gmacs = model_cost(model, img_size)  # faithful cost (what the release computes)
        if name == faithful_baseline:
            label = f"{name} (faithful)"
            rows[label] = ModelRow(label, params, gmacs, extra={"runtime": "torch", "precision": "fp32"})
            runners[label] = TorchRunner(model)
        runners[name] = build_runner(model, runtime, precision, img_size, threads, calibration, batch_size=1,
                                     profile=profile)
        rows[name] = ModelRow(name, params, gmacs, extra={"runtime": runtime, "precision": precision})
    x1 = torch.randn(1, 3, img_size, img_size)
    sessions = {}
    for name in tqdm(list(onnx_models) if runtime == "torch" else [], desc="exporting ONNX", leave=False):
        sessions[name] = onnx_session(onnx_bytes(runners[name].model, x1.expand(2, -1, -1, -1).contiguous()),
                                      threads=threads, spin=False)

    with torch.inference_mode():
        for label, runner in runners.items():
            if isinstance(runner, TorchRunner):
                rows[label].activation_mib = peak_activation_mib(lambda runner=runner: runner(x1))
        candidates: dict[str, Callable[[], Any]] = {label: (lambda r=r: r(x1)) for label, r in runners.items()}
        candidates.update({f"onnx:{n}": (lambda s=s: run_onnx(s, x1)) for n, s in sessions.items()})
        info["loadavg_before"] = list(os.getloadavg())
        timings = interleaved_timings(candidates, repeats, warmup, desc="latency b1")
        for label, timing in timings.items():
            if label.startswith("onnx:"):
                rows[label[5:]].onnxruntime = timing
            else:
                rows[label].latency = timing
        if throughput_batch and throughput_repeats:
            xb = torch.randn(throughput_batch, 3, img_size, img_size)
            batch_runners = {label: r.for_batch(throughput_batch) if isinstance(r, OpenVinoRunner) else r
                             for label, r in runners.items()}
            batch_candidates = {label: (lambda r=r: r(xb)) for label, r in batch_runners.items()}
            for label, timing in interleaved_timings(batch_candidates, throughput_repeats, 1,
                                                     desc=f"throughput b{throughput_batch}").items():
                rows[label].throughput_ips = throughput_batch / (timing.median_ms / 1e3)
                rows[label].throughput_batch = throughput_batch
        info["loadavg_after"] = list(os.getloadavg())
        if profile:
            for label, runner in tqdm(runners.items(), desc="profiling", leave=False):
                ops = runner.profile(x1)
                rows[label].extra["layout_share"] = layout_share(ops)
                rows[label].extra["profile"] = [asdict(op) for op in ops[:12]]
    return list(rows.values()), info


def profile_table(rows: Sequence[ModelRow], top: int = 6) -> str:
    """Markdown: each profiled model's layout share (transposes, reorders, concats, splits, gathers) and its
    largest op types."""
    lines = ["| model | layout + concat + gather share | largest op types (share of node time) |",
             "|---|---:|---|"]
    for row in rows:
        ops = row.extra.get("profile")
        if ops:
            largest = ", ".join(f"{op['op']} {op['share']:.0%}" for op in ops[:top])
            lines.append(f"| {row.name} ({row.extra.get('runtime')} {row.extra.get('precision')}) | "
                         f"{row.extra['layout_share']:.1%} | {largest} |")
    return "\n".join(lines)
