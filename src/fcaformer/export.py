"""Export FcaFormer models: ONNX, TorchScript and ``torch.export`` programs, with round-trip checks.

Every exporter works on the fast path (:func:`fcaformer.fast.fuse_model`) by default: BatchNorm folded, the
attention bias gathered once (it becomes a constant of the graph) and SDPA for the attention.

Dynamic shapes: the batch dim is dynamic in ONNX and in exported programs. The spatial size is *not*: the
token grid decides the position-bias gather, the resizing of the grid-sized parameters (only off the native
grid) and, in windowed mode, the padding, so the graph is specialised to the export size. Export once per
deployment resolution.

All files are written atomically (:mod:`fcaformer.io`).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .fast import fuse_model, is_fused
from .io import atomic_write

ExportFormat = Literal["onnx", "torchscript", "exported-program"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how close the exported graph is to PyTorch."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    max_relative_error: float | None = None
    """Largest ``||out - ref|| / ||ref||`` over the checked batch sizes (``None``: not checked)."""


def relative_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """``||out - ref|| / ||ref||`` in float64 (tiny outputs must not underflow to a zero error)."""
    out64 = torch.as_tensor(np.asarray(out, dtype=np.float64) if isinstance(out, np.ndarray) else out).double()
    ref64 = torch.as_tensor(np.asarray(ref, dtype=np.float64) if isinstance(ref, np.ndarray) else ref).double()
    return ((out64 - ref64).norm() / ref64.norm()).item()


def _prepare(model: nn.Module, fuse: bool) -> nn.Module:
    model = model.eval()
    if fuse and not is_fused(model):
        model = fuse_model(model)
    return model


def _example(model: nn.Module, img_size: tuple[int, int], batch_size: int) -> torch.Tensor:
    param = next(model.parameters())
    return torch.randn(batch_size, 3, *img_size, device=param.device, dtype=param.dtype)


def _flatten_outputs(out: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def onnx_bytes(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True, opset: int = DEFAULT_OPSET
) -> bytes:
    """Serialised ONNX model of ``model`` traced on ``example`` (dynamo-based exporter)."""
    import onnx

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's problem
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False
        )
    buffer = io.BytesIO()
    onnx.save(program.model_proto, buffer)
    return buffer.getvalue()


def onnx_session(model_bytes_or_path: bytes | str | os.PathLike, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU ``InferenceSession``.

    Args:
        model_bytes_or_path: the ONNX model.
        threads: intra-op threads (default: onnxruntime's choice).
        spin: let idle worker threads busy-wait for the next run (onnxruntime's default). Turn it off when
            the session shares the cores with other work, e.g. timed interleaved with PyTorch models: the
            spinning threads would otherwise slow down whatever runs right after.
    """
    import onnxruntime as ort

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


def check_onnx(session, reference: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest relative error of the ONNX outputs against ``reference`` over ``inputs``."""
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            refs = _flatten_outputs(reference(x))
        outs = run_onnx(session, x)
        if len(outs) != len(refs):
            raise RuntimeError(f"ONNX graph returns {len(outs)} outputs, PyTorch {len(refs)}")
        worst = max([worst] + [relative_error(o, r) for o, r in zip(outs, refs)])
    return worst


def check_program(program: nn.Module | torch.export.ExportedProgram, reference: nn.Module,
                  inputs: list[torch.Tensor]) -> float:
    """Largest relative error of a TorchScript module or exported program against ``reference``."""
    runner = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            outs, refs = _flatten_outputs(runner(x)), _flatten_outputs(reference(x))
            worst = max([worst] + [relative_error(o, r) for o, r in zip(outs, refs)])
    return worst


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
) -> ExportResult:
    """Export ``model`` (eval mode, fused unless ``fuse=False``) and optionally check the round trip.

    Args:
        model: an FcaFormer model (or any image model taking ``(B, 3, H, W)``).
        path: output file (its parent is created).
        format: ``"onnx"``, ``"torchscript"`` (``torch.jit.trace``) or ``"exported-program"``
            (``torch.export``, saved with ``torch.export.save``).
        img_size: the (fixed) spatial size of the graph.
        batch_size: example batch used for tracing (at least 2 with a dynamic batch).
        dynamic_batch: mark the batch dim dynamic (ONNX, exported program; a traced TorchScript module is
            batch-agnostic as long as no shape was baked in, which the check verifies).
        fuse: export the fast path (recommended).
        check: run the exported graph (onnxruntime for ONNX) on two batch sizes against PyTorch.

    Raises:
        ValueError: on an unknown format or a bad size.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {EXPORT_FORMATS}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"img_size must be one or two sizes >= 32, got {img_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    if format == "exported-program" and path.suffix != ".pt2":
        raise ValueError(f"exported programs must be saved with a .pt2 suffix (torch.export.load needs it), got {path}")
    reference = model.eval()
    model = _prepare(model, fuse)
    # torch.export specialises sizes 0 and 1, so a dynamic batch is traced with at least 2 images.
    example = _example(model, size, max(batch_size, 2) if dynamic_batch else batch_size)
    check_inputs = [example, _example(model, size, 1), _example(model, size, 3)] if dynamic_batch else [example]
    error: float | None = None

    if format == "onnx":
        data = onnx_bytes(model, example, dynamic_batch=dynamic_batch, opset=opset)
        atomic_write(path, lambda handle: handle.write(data))
        if check:
            error = check_onnx(onnx_session(data), reference, check_inputs)
    elif format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; it still serves old runtimes
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            traced = torch.jit.freeze(traced)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atomic_write(path, lambda handle: torch.jit.save(traced, handle))
            loaded = torch.jit.load(str(path)) if check else None
        if loaded is not None:
            error = check_program(loaded, reference, check_inputs)
    else:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        atomic_write(path, lambda handle: torch.export.save(program, handle))
        if check:
            error = check_program(torch.export.load(str(path)), reference, check_inputs)
    return ExportResult(path, format, tuple(example.shape), dynamic_batch, error)
