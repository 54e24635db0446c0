"""CPU deployment: FcaFormer (and any timm model) under PyTorch, ONNX Runtime or OpenVINO, in fp32, bf16 or int8.

One entry point, :func:`build_runner`, gives a callable that runs a batch of images under a chosen runtime and
precision, so that FcaFormer and its peers can be measured under the *same* runtime (``fcaformer benchmark
--runtime``) and exports can be checked against PyTorch (``fcaformer export --format openvino|onnx``):

- ``torch``: the fused fast path (:func:`fcaformer.fast.fuse_model`), fp32 or bf16 (CPU autocast);
- ``onnxruntime``: the ONNX graph, fp32, or int8 (QDQ nodes placed and calibrated on real images by NNCF);
- ``openvino``: the OpenVINO model converted from PyTorch, fp32, bf16 (an inference-precision hint: only CPUs
  with native bf16, e.g. AVX-512-BF16 or AMX, run it; elsewhere OpenVINO silently stays in fp32, which
  :func:`openvino_precision_supported` tells ahead), or int8 quantized by NNCF (post-training, calibrated on
  real images).

FcaFormer hybrids go to ONNX and OpenVINO as the lean graph (:mod:`fcaformer.lean`): a single channels-first
layout the runtimes optimise end to end. The runtime packages are optional extras (``[export]``: ONNX and ONNX
Runtime; ``[deploy]``: those, OpenVINO and NNCF); :func:`fcaformer.errors.require` names the extra when one is
missing.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .errors import require
from .fast import fast_attention_modules, fuse_model
from .images import expand_image_inputs
from .lean import lean_model, supports_lean
from .train.data import build_eval_transform

DEFAULT_OPSET = 18
"""ONNX opset of the exported graphs."""
Runtime = Literal["torch", "onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "int8"]
RUNTIMES: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
SUPPORTED: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
"""Precisions each runtime offers here. PyTorch's own int8 CPU inference (``torch.ao.quantization``) is
deprecated upstream, and ONNX Runtime's CPU provider has no bf16 kernels for these models. int8 needs NNCF
(the ``[deploy]`` extra) for either runtime."""

LAYOUT_OPS = ("Transpose", "Reorder", "Concat", "Gather", "Split", "VariadicSplit", "Slice", "StridedSlice",
              "aten::cat", "aten::copy_", "aten::clone", "aten::index", "aten::contiguous")
"""Op types (OpenVINO / ONNX Runtime node types, PyTorch ops) that move or reorder data rather than compute."""


def check_precision(runtime: str, precision: str) -> None:
    """Raise ``ValueError`` (one line, with what is offered) for an unknown or unsupported combination."""
    if runtime not in SUPPORTED:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision not in SUPPORTED[runtime]:
        offered = ", ".join(f"{r}: {'/'.join(p)}" for r, p in SUPPORTED.items())
        raise ValueError(f"{runtime} does not offer {precision} here ({offered})")


# ------------------------------------------------------------------------------------------- inference graphs
def inference_graph(model: nn.Module, runtime: str, img_size: tuple[int, int] | None = None) -> nn.Module:
    """The form of ``model`` each runtime gets: the lean graph for hybrid FcaFormers outside PyTorch (gathered
    for ``img_size``), the fused fast path for PyTorch and for the other FcaFormers, timm's reparameterized
    form for anything else. ``model`` is not modified."""
    from timm.utils.model import reparameterize_model

    model = model.eval()
    if not fast_attention_modules(model):
        return reparameterize_model(model)
    if runtime != "torch" and supports_lean(model):
        lean = lean_model(model)
        return lean.prepare(img_size) if img_size else lean
    return fuse_model(model)


# ---------------------------------------------------------------------------------------------------- ONNX
def relative_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """``||out - ref|| / ||ref||`` in float64 (tiny outputs must not underflow to a zero error)."""
    out64 = torch.as_tensor(np.asarray(out, dtype=np.float64) if isinstance(out, np.ndarray) else out).double()
    ref64 = torch.as_tensor(np.asarray(ref, dtype=np.float64) if isinstance(ref, np.ndarray) else ref).double()
    return ((out64 - ref64).norm() / ref64.norm()).item()


def onnx_bytes(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True, opset: int = DEFAULT_OPSET
) -> bytes:
    """Serialised ONNX model of ``model`` traced on ``example`` (dynamo-based exporter)."""
    onnx = require("onnx", feature="ONNX export")
    require("onnxscript", feature="ONNX export")  # torch's ONNX exporter imports it

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's problem
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False
        )
    buffer = io.BytesIO()
    onnx.save(program.model_proto, buffer)
    return buffer.getvalue()


def onnx_with_metadata(model_bytes: bytes, entries: Mapping[str, str]) -> bytes:
    """The ONNX model with ``entries`` set in its ``metadata_props`` (ONNX Runtime:
    ``session.get_modelmeta().custom_metadata_map``)."""
    onnx = require("onnx", feature="ONNX export")
    proto = onnx.load_from_string(model_bytes)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **entries})
    return proto.SerializeToString()


def onnx_session(model_bytes_or_path: bytes | str | os.PathLike, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU ``InferenceSession``.

    Args:
        model_bytes_or_path: the ONNX model.
        threads: intra-op threads (default: onnxruntime's choice).
        spin: let idle worker threads busy-wait for the next run (onnxruntime's default). Turn it off when
            the session shares the cores with other work, e.g. timed interleaved with PyTorch models: the
            spinning threads would otherwise slow down whatever runs right after.
    """
    ort = require("onnxruntime", feature="ONNX Runtime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> list[np.ndarray]:
    """Run an onnxruntime session on one image batch."""
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


# --------------------------------------------------------------------------------------------- calibration
def list_images(root: str | os.PathLike, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files under ``root`` (a folder searched recursively, or one image file) in a class-balanced random
    order: each folder's images (a class, in an ImageFolder split) shuffled with ``seed``, then taken round-robin
    over the folders in a shuffled order, so that every prefix (the first ``limit``) covers the classes evenly.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: it holds no images.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = expand_image_inputs([root], recursive=True)
    rng = np.random.default_rng(seed)
    groups: dict[Path, list[Path]] = {}
    for path in files:
        groups.setdefault(path.parent, []).append(path)
    shuffled = [[group[i] for i in rng.permutation(len(group))] for group in groups.values()]
    shuffled = [shuffled[i] for i in rng.permutation(len(shuffled))]
    order = [group[i] for i in range(max(map(len, shuffled))) for group in shuffled if i < len(group)]
    return order[:limit] if limit is not None else order


def calibration_and_check_images(root: str | os.PathLike, calibration: int, check: int,
                                 check_root: str | os.PathLike | None = None,
                                 seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Disjoint calibration and check images for an int8 export, each a class-balanced random sample
    (:func:`list_images`).

    Without ``check_root`` both come from ``root``: the calibration images first, the check images from the rest.
    When ``root`` has fewer than ``calibration + check`` images they are shared in proportion, so that the check
    never reuses a calibration image. With ``check_root`` (e.g. a validation split) the check images come from
    there (any that are also calibration images are left out).
    """
    if calibration < 1 or check < 0:
        raise ValueError(f"need at least one calibration image and no negative check count, got {calibration} and "
                         f"{check}")
    ordered = list_images(root, seed=seed)
    if check_root is not None:
        chosen = ordered[:calibration]
        taken = {p.resolve() for p in chosen}
        return chosen, [p for p in list_images(check_root, seed=seed) if p.resolve() not in taken][:check]
    if len(ordered) < calibration + check:
        wanted = calibration + check
        calibration = max(1, min(calibration, round(len(ordered) * calibration / wanted)))
    return ordered[:calibration], ordered[calibration : calibration + check]


def load_images(paths: Sequence[Path], transform: Callable) -> torch.Tensor:
    """``(N, 3, H, W)`` tensor of the images through ``transform`` (e.g. the model's eval transform)."""
    from PIL import Image

    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors)


def eval_transform(data_config: dict[str, Any], img_size: tuple[int, int]) -> Callable:
    """The eval transform (:func:`fcaformer.train.data.build_eval_transform`) of a model's data config (timm's
    ``pretrained_cfg`` keys or a project checkpoint's ``data_config``, defaults for missing keys) at ``img_size``."""
    size = img_size[0] if img_size[0] == img_size[1] else tuple(img_size)
    return build_eval_transform(size, data_config.get("crop_pct", 0.875), data_config.get("interpolation", "bicubic"),
                                data_config.get("mean", (0.485, 0.456, 0.406)),
                                data_config.get("std", (0.229, 0.224, 0.225)), data_config.get("crop_mode", "center"))


# ------------------------------------------------------------------------------------------------- OpenVINO
def openvino_precision_supported(precision: str) -> bool:
    """Whether this machine's CPU runs ``precision`` natively in OpenVINO (bf16 needs BF16 in the CPU's
    optimization capabilities; without it OpenVINO runs the model in fp32)."""
    if precision != "bf16":
        return True
    ov = require("openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def to_openvino(graph: nn.Module, img_size: tuple[int, int], precision: str = "fp32",
                calibration: torch.Tensor | None = None, dynamic_batch: bool = True,
                control: torch.Tensor | None = None, min_agreement: float | None = None) -> Any:
    """Convert an inference graph (see :func:`inference_graph`) to an ``openvino.Model``.

    int8 quantizes with NNCF on ``calibration`` images (required; with ``min_agreement`` also ``control`` images,
    see :func:`quantize_openvino`); bf16 records the inference-precision hint in the model (``runtime_options``),
    so a saved model compiles in bf16 where the CPU has it.
    """
    ov = require("openvino")
    check_precision("openvino", precision)
    example = torch.zeros(1, 3, *img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches (size is fixed)
        model = ov.convert_model(graph, example_input=example,
                                 input=[(-1 if dynamic_batch else 1, 3, *img_size)])
    if precision == "int8":
        model = quantize_openvino(model, _require_calibration(calibration), control, min_agreement)
    elif precision == "bf16":
        model.set_rt_info("bf16", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    return model


def _nncf() -> Any:
    import logging

    # NNCF imports torch's extension loader, which logs that there is no CUDA on a CPU machine: not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    nncf = require("nncf")
    nncf.set_log_level(logging.ERROR)
    return nncf


def _nncf_options(samples: list[Any], activation_matmuls: list[str]) -> dict[str, Any]:
    """NNCF post-training int8 quantization (the transformer preset, for every model alike), leaving the
    products of two activations (attention's ``q k^T`` and ``attn v``) in fp32: in int8 they were no faster on
    the AVX2 machine measured, and they carry the softmax's dynamic range. Weight products are quantized."""
    nncf = _nncf()
    return dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
                ignored_scope=nncf.IgnoredScope(names=activation_matmuls))


def _nncf_quantize(model: Any, samples: list[Any], activation_matmuls: list[str]) -> Any:
    """:func:`_nncf_options` quantization on ``samples``."""
    nncf = _nncf()
    return nncf.quantize(model, nncf.Dataset(samples), **_nncf_options(samples, activation_matmuls))


def quantize_openvino(model: Any, calibration: torch.Tensor, control: torch.Tensor | None = None,
                      min_agreement: float | None = None) -> Any:
    """int8 ``openvino.Model`` by NNCF (see :func:`_nncf_options`), calibrated on ``calibration`` images.

    With ``min_agreement`` (a fraction, e.g. 0.99) and ``control`` images (others than the calibration images),
    NNCF's accuracy control then gives layers back to fp32, the most sensitive first, until the int8 model's top-1
    agrees with the fp32 model's on at least that share of the control images. On weakly trained or low-resolution
    models, whose predictions are often near ties, plain int8 can flip more than 1 % of them.
    """

    def constant(output: Any) -> bool:  # a weight, possibly behind a Convert
        node = output.get_node()
        return node.get_type_name() == "Constant" or (node.get_type_name() == "Convert"
                                                      and node.input_value(0).get_node().get_type_name() == "Constant")

    names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
             and not any(constant(op.input_value(i)) for i in range(2))]
    samples = [calibration[i : i + 1].numpy() for i in range(len(calibration))]
    if min_agreement is None:
        return _nncf_quantize(model, samples, names)
    if control is None or not len(control):
        raise ValueError("min_agreement needs control images (others than the calibration images)")
    nncf = _nncf()
    fp32 = compile_openvino(model)
    items = [(control[i : i + 1].numpy(), int(np.argmax(fp32(control[i : i + 1].numpy())[0]))) for i in
             range(len(control))]

    def agreement(compiled: Any, data: Any) -> tuple[float, list[float]]:  # per item too: NNCF ranks with them
        hits = [float(np.argmax(compiled(image)[0]) == label) for image, label in data]
        return float(np.mean(hits)), hits

    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(samples), nncf.Dataset(items, lambda item: item[0]), agreement,
        max_drop=1.0 - min_agreement, drop_type=nncf.DropType.ABSOLUTE, **_nncf_options(samples, names))


def compile_openvino(model: Any, threads: int | None = None, precision: str = "fp32", batch_size: int | None = None,
                     profile: bool = False) -> Any:
    """Compile an ``openvino.Model`` (or a path to a saved one) for the CPU, latency mode (one stream).

    ``batch_size`` fixes the batch dim first, on a copy (static shapes compile to faster code).
    """
    ov = require("openvino")
    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(str(model))
    shape = model.inputs[0].get_partial_shape()
    if batch_size is not None and (shape[0].is_dynamic or shape[0].get_length() != batch_size):
        model = model.clone()  # the caller's model keeps its batch dim
        model.reshape([batch_size, *(d.get_length() for d in list(shape)[1:])])
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if profile:
        config["PERF_COUNT"] = True
    return core.compile_model(model, "CPU", config)


def save_openvino(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` as ``path`` (``.xml``) and its ``.bin`` beside it, each replaced atomically (the weights
    first, so a reader never pairs a new ``.xml`` with old weights)."""
    ov = require("openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"OpenVINO models are saved as .xml (+ .bin), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        ov.save_model(model, str(Path(tmp) / path.name), compress_to_fp16=False)
        os.replace(Path(tmp) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(Path(tmp) / path.name, path)
    return path


# --------------------------------------------------------------------------------------------- ONNX Runtime
def quantize_onnx(model_bytes: bytes, calibration: torch.Tensor) -> bytes:
    """int8 ONNX model (QDQ nodes, which ONNX Runtime runs as int8 kernels) by NNCF (see :func:`_nncf_quantize`),
    calibrated on ``calibration`` images.

    NNCF rather than ONNX Runtime's own ``quantize_static``: on a trained model and real images its top-1
    agreement with fp32 was 97 % against 89 % (300 Imagenette images, docs/deployment.md).
    """
    onnx = require("onnx", feature="ONNX export")
    proto = onnx.load_from_string(model_bytes)
    weights = {init.name for init in proto.graph.initializer}
    weights |= {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    names = [node.name for node in proto.graph.node
             if node.op_type == "MatMul" and not any(i in weights for i in node.input)]
    input_name = proto.graph.input[0].name
    samples = [{input_name: calibration[i : i + 1].numpy()} for i in range(len(calibration))]
    return _nncf_quantize(proto, samples, names).SerializeToString()


def to_onnx(graph: nn.Module, img_size: tuple[int, int], precision: str = "fp32",
            calibration: torch.Tensor | None = None, dynamic_batch: bool = True) -> bytes:
    """Serialised ONNX model of an inference graph, fp32 or int8 (:func:`quantize_onnx`)."""
    check_precision("onnxruntime", precision)
    example = torch.zeros(2 if dynamic_batch else 1, 3, *img_size)
    data = onnx_bytes(graph, example, dynamic_batch=dynamic_batch)
    if precision == "int8":
        data = quantize_onnx(data, _require_calibration(calibration))
    return data


def _require_calibration(calibration: torch.Tensor | None) -> torch.Tensor:
    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 needs calibration images: pass a folder of real images (--calib DIR)")
    return calibration


# ------------------------------------------------------------------------------------------------- runners
@dataclass
class OpProfile:
    """Time spent per op type over profiled forwards."""

    op: str
    share: float
    ms_per_forward: float
    calls_per_forward: float


class Runner:
    """A model under one runtime and precision: ``runner(x)`` takes a float ``(B, 3, H, W)`` tensor or array and
    returns the first output as a float32 numpy array."""

    runtime: str = ""
    precision: str = ""

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def profile(self, x: torch.Tensor, repeats: int = 10) -> list[OpProfile]:
        """Per-op-type time over ``repeats`` forwards (after one warm-up), largest first."""
        raise NotImplementedError


def _summarise(totals: dict[str, float], calls: dict[str, int], repeats: int) -> list[OpProfile]:
    total = sum(totals.values()) or 1.0
    return [OpProfile(op, seconds / total, seconds / repeats * 1e3, calls[op] / repeats)
            for op, seconds in sorted(totals.items(), key=lambda item: -item[1])]


class TorchRunner(Runner):
    """PyTorch eager (fp32, or bf16 through CPU autocast)."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        check_precision("torch", precision)
        self.model, self.runtime, self.precision = model.eval(), "torch", precision

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(torch.as_tensor(x))

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return self._forward(torch.as_tensor(x)).float().numpy()

    def profile(self, x: torch.Tensor, repeats: int = 10) -> list[OpProfile]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        self._forward(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                self._forward(x)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        return _summarise({e.key: e.self_cpu_time_total / 1e6 for e in events}, {e.key: e.count for e in events},
                          repeats)


class OnnxRunner(Runner):
    """An ONNX Runtime CPU session (worker threads do not spin, so interleaved timings stay fair)."""

    def __init__(self, model_bytes: bytes, threads: int | None = None, precision: str = "fp32") -> None:
        self.model_bytes, self.threads, self.runtime, self.precision = model_bytes, threads, "onnxruntime", precision
        self.session = onnx_session(model_bytes, threads=threads, spin=False)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def profile(self, x: torch.Tensor, repeats: int = 10) -> list[OpProfile]:
        ort = require("onnxruntime", feature="ONNX Runtime")
        options = ort.SessionOptions()
        options.enable_profiling = True
        if self.threads:
            options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        with tempfile.TemporaryDirectory() as tmp:
            options.profile_file_prefix = str(Path(tmp) / "ort")
            session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
            feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
            session.run(None, feed)
            for _ in range(repeats):
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        totals: dict[str, float] = collections.defaultdict(float)
        calls: dict[str, int] = collections.Counter()
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        for event in nodes[len(nodes) // (repeats + 1):]:  # drop the warm-up run
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
            calls[event["args"]["op_name"]] += 1
        return _summarise(totals, calls, repeats)


class OpenVinoRunner(Runner):
    """An OpenVINO compiled model with one infer request (latency mode)."""

    def __init__(self, model: Any, threads: int | None = None, precision: str = "fp32",
                 batch_size: int | None = None, profile: bool = False) -> None:
        self.runtime, self.precision = "openvino", precision
        self.model, self.threads, self.profiling = model, threads, profile
        self.compiled = compile_openvino(model, threads, precision, batch_size, profile)
        self.request = self.compiled.create_infer_request()

    def for_batch(self, batch_size: int) -> OpenVinoRunner:
        """The same model compiled for another fixed batch size (no new conversion or quantization)."""
        return OpenVinoRunner(self.model, self.threads, self.precision, batch_size, self.profiling)

    @property
    def effective_precision(self) -> str:
        """The precision OpenVINO actually compiled for (``f32`` where a bf16 hint is not supported)."""
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(self.request.get_output_tensor(0).data, dtype=np.float32).copy()

    def profile(self, x: torch.Tensor, repeats: int = 10) -> list[OpProfile]:
        if not self.profiling:
            raise ValueError("build the runner with profile=True to profile OpenVINO")
        feed = {0: np.ascontiguousarray(x, dtype=np.float32)}
        self.request.infer(feed)
        totals: dict[str, float] = collections.defaultdict(float)
        calls: dict[str, int] = collections.Counter()
        for _ in range(repeats):
            self.request.infer(feed)
            for info in self.request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    totals[info.node_type] += info.real_time.total_seconds()
                    calls[info.node_type] += 1
        return _summarise(totals, calls, repeats)


def layout_share(profile: Sequence[OpProfile]) -> float:
    """Share of the profiled time spent in layout changes, concatenations, splits and gathers."""
    return sum(p.share for p in profile if p.op in LAYOUT_OPS)


def build_runner(model: nn.Module, runtime: str, precision: str = "fp32", img_size: int | tuple[int, int] = 224,
                 threads: int | None = None, calibration: torch.Tensor | None = None, batch_size: int | None = None,
                 profile: bool = False) -> Runner:
    """``model`` (eval mode; not modified) under ``runtime`` and ``precision``, as a :class:`Runner`.

    Args:
        model: an FcaFormer or any timm image model.
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"`` (see :data:`SUPPORTED`).
        img_size: the input size the graph is built for (ONNX and OpenVINO graphs are specialised to it).
        threads: intra-op threads of the runtime (PyTorch's are process-wide: set them yourself).
        calibration: ``(N, 3, H, W)`` preprocessed real images, required for int8.
        batch_size: OpenVINO only: compile for this fixed batch (faster than the dynamic batch).
        profile: OpenVINO only: collect per-node times (needed for :meth:`Runner.profile`).

    Raises:
        ValueError: unsupported runtime / precision, or int8 without calibration images.
        fcaformer.errors.MissingExtraError: OpenVINO or NNCF missing.
    """
    check_precision(runtime, precision)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if precision == "int8":
        _require_calibration(calibration)
    graph = inference_graph(model, runtime, size)
    if runtime == "torch":
        return TorchRunner(graph, precision)
    if runtime == "onnxruntime":
        return OnnxRunner(to_onnx(graph, size, precision, calibration), threads, precision)
    return OpenVinoRunner(to_openvino(graph, size, precision, calibration), threads, precision, batch_size, profile)


# ---------------------------------------------------------------------------------------------- agreement
@dataclass
class Agreement:
    """How a runner's outputs compare with a PyTorch reference on the same images."""

    images: int
    max_relative_error: float
    """Largest per-batch ``||out - ref|| / ||ref||``."""
    top1_agreement: float
    """Fraction of images whose top-1 class is the reference's."""


def compare_outputs(runner: Callable[[torch.Tensor], Any], reference: nn.Module, images: torch.Tensor,
                    batch_size: int = 16) -> Agreement:
    """Run ``runner`` and ``reference`` (fp32 PyTorch) on ``images`` and compare."""

    worst, agree = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        with torch.inference_mode():
            ref = reference(batch)
        ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).float()  # a backbone: its first map
        out = torch.as_tensor(np.asarray(runner(batch), dtype=np.float32))
        worst = max(worst, relative_error(out, ref))
        if ref.ndim == 2:
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
    return Agreement(len(images), worst, agree / max(len(images), 1))

