"""Reading checkpoint files: torch files (weights only) and safetensors files, with errors that name the file and
the problem. Knows no checkpoint format: what the content means is for the format modules beside it."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a file (weights only, onto the CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a folder, or a file that is truncated, corrupt, not a torch file, or holds objects other
            than tensors and plain containers.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint (truncated, corrupt, or not a torch file): {_first_line(error)}"
        ) from error
    except Exception as error:  # the weights-only unpickler rejects arbitrary objects with various error types
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {_first_line(error)}") from error


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a ``.safetensors`` file. Metadata values that are JSON (as
    :func:`fcaformer.weights.save_model` writes them) are decoded; others (e.g. ``{"format": "pt"}`` of files
    written by other tools) stay strings.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a file safetensors cannot read (truncated or corrupt).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path} as a safetensors file (truncated or corrupt?): {_first_line(error)}"
        ) from error
    return state_dict, {key: _json_or_text(value) for key, value in metadata.items()}


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """The content of a checkpoint file: a ``.safetensors`` file as ``{**its metadata, "state_dict": tensors}``,
    anything else through :func:`read_torch_file`."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        state_dict, metadata = read_safetensors(path)
        return {**metadata, "state_dict": state_dict}
    return read_torch_file(path)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _first_line(error: BaseException) -> str:
    """An exception's message on one line (torch's unpickling errors run over many)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
