"""Export FcaFormer models: ONNX, OpenVINO, TorchScript and ``torch.export`` programs, with round-trip checks.

Every exporter works on an inference form by default: for ONNX and OpenVINO the lean graph of the hybrid models
(:mod:`fcaformer.lean`: one channels-first layout, biases as constants), for the PyTorch formats (and for the
models the lean graph does not cover) the fused fast path (:func:`fcaformer.fast.fuse_model`: BatchNorm folded,
the attention bias gathered once, SDPA). ONNX can be int8 (ONNX Runtime static quantization), OpenVINO bf16 or
int8 (NNCF), both calibrated on real images (:mod:`fcaformer.deploy`).

Dynamic shapes: the batch dim is dynamic in ONNX and in exported programs. The spatial size is *not*: the
token grid decides the position-bias gather, the resizing of the grid-sized parameters (only off the native
grid) and, in windowed mode, the padding, so the graph is specialised to the export size. Export once per
deployment resolution.

All files are written atomically (:mod:`fcaformer.files`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .deploy import (
    DEFAULT_OPSET,
    OnnxRunner,
    OpenVinoRunner,
    compare_outputs,
    inference_graph,
    onnx_bytes,
    onnx_with_metadata,
    quantize_onnx,
    relative_error,
    run_onnx,
    save_openvino,
    to_openvino,
)
from .fast import fast_attention_modules, fuse_model, is_fused
from .files import atomic_write

ExportFormat = Literal["onnx", "openvino", "torchscript", "exported-program"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "openvino", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".ts", "exported-program": ".pt2"}
FORMAT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch", "exported-program": "torch"}
"""The runtime each format is checked with (and whose precisions it offers)."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how close the exported graph is to PyTorch."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    max_relative_error: float | None = None
    """Largest ``||out - ref|| / ||ref||`` over the checked batches (``None``: not checked)."""
    precision: str = "fp32"
    top1_agreement: float | None = None
    """Share of the real check images whose top-1 class matches PyTorch fp32 (``None``: no images given)."""
    check_images: int = 0
    """How many real images the check ran on (besides random inputs for fp32)."""


def _prepare(model: nn.Module, fuse: bool, format: str, size: tuple[int, int]) -> nn.Module:
    model = model.eval()
    if not fuse:
        return model
    if format in ("onnx", "openvino"):
        return inference_graph(model, FORMAT_RUNTIMES[format], size)
    if fast_attention_modules(model) and not is_fused(model):
        return fuse_model(model)
    return model


def _example(model: nn.Module, img_size: tuple[int, int], batch_size: int) -> torch.Tensor:
    param = next(model.parameters())
    return torch.randn(batch_size, 3, *img_size, device=param.device, dtype=param.dtype)


def _flatten_outputs(out: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_relative_error(outputs: Callable[[torch.Tensor], Sequence[Any]], reference: nn.Module,
                       inputs: Sequence[torch.Tensor]) -> float:
    """Largest relative error of ``outputs(x)`` (a list of arrays or tensors) against ``reference(x)`` over
    ``inputs``, output by output."""
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            refs = _flatten_outputs(reference(x))
        outs = list(outputs(x))
        if len(outs) != len(refs):
            raise RuntimeError(f"the exported graph returns {len(outs)} outputs, PyTorch {len(refs)}")
        worst = max([worst] + [relative_error(o, r) for o, r in zip(outs, refs)])
    return worst


def check_onnx(session, reference: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest relative error of the ONNX outputs against ``reference`` over ``inputs``."""
    return max_relative_error(lambda x: run_onnx(session, x), reference, inputs)


def check_program(program: nn.Module | torch.export.ExportedProgram, reference: nn.Module,
                  inputs: list[torch.Tensor]) -> float:
    """Largest relative error of a TorchScript module or exported program against ``reference``."""
    runner = program.module() if isinstance(program, torch.export.ExportedProgram) else program

    def outputs(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _flatten_outputs(runner(x))

    return max_relative_error(outputs, reference, inputs)


METADATA_KEY = "fcaformer"
"""Where each format keeps :func:`export_metadata`: the OpenVINO IR's ``rt_info["fcaformer"]``, the ONNX model's
``metadata_props["fcaformer"]`` (both a JSON string), ``fcaformer.json`` among the extra files of a TorchScript or
``torch.export`` archive."""


def export_metadata(data_config: Mapping[str, Any], img_size: tuple[int, int],
                    class_names: Sequence[str] | None = None, record: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """What a deployer needs besides the graph: the class order and the preprocessing at the export size, spelled
    out (resize the shorter side to ``resize``, centre crop to ``img_size``, scale to [0, 1], normalise), plus
    ``record`` (architecture, source)."""
    crop_pct = float(data_config.get("crop_pct", 0.875))
    crop_mode = data_config.get("crop_mode", "center")
    height, width = img_size
    resize = [math.floor(height / crop_pct), math.floor(width / crop_pct)] if height != width else \
        math.floor(height / crop_pct)
    steps = {"center": f"resize the shorter side to {resize} px, centre crop {height}x{width}",
             "squash": f"resize to {resize} x {resize} px (aspect not kept), centre crop {height}x{width}"}
    return {
        **dict(record or {}),
        "class_names": list(class_names) if class_names else None,
        "input": {"layout": "NCHW", "color": "RGB", "dtype": "float32", "height": height, "width": width},
        "preprocessing": {
            "resize": resize, "crop_mode": crop_mode, "crop_pct": crop_pct, "crop": [height, width],
            "interpolation": data_config.get("interpolation", "bicubic"),
            "mean": list(data_config.get("mean", (0.485, 0.456, 0.406))),
            "std": list(data_config.get("std", (0.229, 0.224, 0.225))),
            "steps": steps.get(crop_mode, f"timm eval transform, crop_mode={crop_mode}")
                     + ", to float in [0, 1], subtract mean, divide by std (per channel)",
        },
    }


def check_export_options(format: str, precision: str, min_agreement: float | None = None) -> None:
    """``ValueError`` (one line) for a precision the format does not take, or a minimum agreement outside an
    OpenVINO int8 export."""
    allowed = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}.get(format, ("fp32",))
    if precision not in allowed:
        raise ValueError(f"{format} exports take precision {' or '.join(allowed)}, got {precision!r}")
    if min_agreement is not None and (format, precision) != ("openvino", "int8"):
        raise ValueError("a minimum agreement (--min-agreement) applies to OpenVINO int8 exports only")


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: ExportFormat = "onnx",
    img_size: int | tuple[int, int] = 224,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    fuse: bool = True,
    check: bool = True,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    calibration: torch.Tensor | None = None,
    check_images: torch.Tensor | None = None,
    metadata: Mapping[str, Any] | None = None,
    control_images: torch.Tensor | None = None,
    min_agreement: float | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode, as its inference form unless ``fuse=False``) and optionally check the result.

    Args:
        model: an FcaFormer model (or any image model taking ``(B, 3, H, W)``).
        path: output file (its parent is created); OpenVINO writes ``.xml`` plus a ``.bin`` beside it.
        format: ``"onnx"``, ``"openvino"`` (needs the ``[deploy]`` extra), ``"torchscript"``
            (``torch.jit.trace``) or ``"exported-program"`` (``torch.export``, saved with ``torch.export.save``).
        img_size: the (fixed) spatial size of the graph.
        batch_size: example batch used for tracing (at least 2 with a dynamic batch).
        dynamic_batch: mark the batch dim dynamic (ONNX, OpenVINO, exported program; a traced TorchScript
            module is batch-agnostic as long as no shape was baked in, which the check verifies).
        fuse: export the inference form: the lean graph for ONNX / OpenVINO where it applies, else the fast
            path (recommended).
        check: run the exported graph (ONNX Runtime for ONNX, OpenVINO for OpenVINO) against PyTorch fp32 on
            random inputs of two batch sizes and on ``check_images``.
        precision: ``"fp32"``; ONNX also ``"int8"``, OpenVINO also ``"bf16"`` and ``"int8"``.
        calibration: ``(N, 3, H, W)`` preprocessed real images for int8 calibration.
        check_images: ``(N, 3, H, W)`` preprocessed real images (others than the calibration images) for the
            check: relative error and top-1 agreement with PyTorch fp32.
        metadata: stored in the file as JSON under :data:`METADATA_KEY` (class names, preprocessing: see
            :func:`export_metadata`).
        control_images, min_agreement: OpenVINO int8: layers go back to fp32, the most sensitive first, until the
            top-1 agreement with fp32 on ``control_images`` (others than the calibration and check images) is at
            least ``min_agreement`` (a fraction; :func:`fcaformer.deploy.quantize_openvino`).

    Raises:
        ValueError: on an unknown format or precision, a bad size or suffix, or int8 without calibration.
        fcaformer.errors.MissingExtraError: ONNX, OpenVINO or NNCF missing.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {EXPORT_FORMATS}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"img_size must be one or two sizes >= 32, got {img_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_export_options(format, precision, min_agreement)
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ValueError("int8 export needs calibration images: pass a folder of real images (--calib DIR)")
    path = Path(path)
    if path.suffix != SUFFIXES[format] and format in ("exported-program", "openvino"):
        needs = "torch.export.load needs it" if format == "exported-program" else "the weights go to a .bin beside it"
        raise ValueError(f"{format} files must have the {SUFFIXES[format]} suffix ({needs}), got {path}")
    reference = model.eval()
    model = _prepare(model, fuse, format, size)
    # torch.export specialises sizes 0 and 1, so a dynamic batch is traced with at least 2 images.
    example = _example(model, size, max(batch_size, 2) if dynamic_batch else batch_size)
    check_inputs = [example, _example(model, size, 1), _example(model, size, 3)] if dynamic_batch else [example]
    outputs: Callable[[torch.Tensor], Sequence[Any]] | None = None
    extra_files = {f"{METADATA_KEY}.json": json.dumps(metadata)} if metadata else {}

    if format == "onnx":
        data = onnx_bytes(model, example, dynamic_batch=dynamic_batch, opset=opset)
        if precision == "int8":
            data = quantize_onnx(data, calibration)
        if metadata:
            data = onnx_with_metadata(data, {METADATA_KEY: json.dumps(metadata)})
        atomic_write(path, lambda handle: handle.write(data))
        if check:
            session = OnnxRunner(data, precision=precision).session
            outputs = lambda x: run_onnx(session, x)  # noqa: E731
    elif format == "openvino":
        graph = to_openvino(model, size, precision, calibration, dynamic_batch, control_images, min_agreement)
        if metadata:
            graph.set_rt_info(json.dumps(metadata), [METADATA_KEY])
        save_openvino(graph, path)
        if check:
            compiled = OpenVinoRunner(path, precision=precision).compiled
            outputs = lambda x: compiled(x.numpy()).to_tuple()  # noqa: E731
    elif format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; it still serves old runtimes
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            traced = torch.jit.freeze(traced)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atomic_write(path, lambda handle: torch.jit.save(traced, handle, _extra_files=extra_files))
            loaded = torch.jit.load(str(path)) if check else None
        if loaded is not None:
            outputs = lambda x: _flatten_outputs(loaded(x))  # noqa: E731
    else:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        atomic_write(path, lambda handle: torch.export.save(program, handle, extra_files=extra_files))
        if check:
            runner = torch.export.load(str(path)).module()
            outputs = lambda x: _flatten_outputs(runner(x))  # noqa: E731

    result = ExportResult(path, format, tuple(example.shape), dynamic_batch, precision=precision)
    if outputs is not None:
        with torch.no_grad():
            result.max_relative_error = max_relative_error(outputs, reference, check_inputs)
            if check_images is not None and len(check_images):
                agreement = compare_outputs(lambda x: outputs(x)[0], reference, check_images)
                result.max_relative_error = max(result.max_relative_error, agreement.max_relative_error)
                result.top1_agreement, result.check_images = agreement.top1_agreement, agreement.images
    return result
