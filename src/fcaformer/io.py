"""Crash-safe file writes and the project's own checkpoint format."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, resize_grid_parameters
from .models.names import describe_model
from .profile import count_params

PROJECT_FORMAT = "fcaformer-checkpoint-v1"


def path_label(path: str | os.PathLike) -> str:
    """A path as the project records it in the files it writes: its last two components (``val/img.jpg``,
    ``digits/model.pt``), enough to say what it is and nothing about the machine it was made on."""
    return "/".join(Path(path).resolve().parts[-2:])


def relative_path(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` (the dataset or run root it was found under), as recorded in written files;
    :func:`path_label` when it is not under ``root``."""
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return path_label(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write a file all-or-nothing: ``write(fileobj)`` into a temp file beside ``path``, fsync, rename.

    A crash or kill at any point leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_json_dump(obj: Any, path: str | os.PathLike) -> Path:
    """``json.dump`` (indented) through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: json.dump(obj, handle, indent=2), binary=False)


def atomic_report(results: Any, markdown: str, stem: str | os.PathLike) -> tuple[Path, Path]:
    """A benchmark's report: ``results`` as ``<stem>.json`` and ``markdown`` as ``<stem>.md``, each atomically."""
    stem = Path(stem)
    return (atomic_json_dump(results, stem.with_suffix(".json")),
            atomic_write(stem.with_suffix(".md"), lambda handle: handle.write(markdown), binary=False))


def model_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict[str, Any], **extra: Any) -> dict:
    """A self-describing checkpoint: enough to rebuild ``model`` with :func:`load_model` alone.

    ``model_label`` names the network really built (:func:`fcaformer.models.names.describe_model`) and
    ``params`` counts its parameters; ``extra`` entries (e.g. ``class_names``, ``metrics``, ``macs``) are stored
    alongside.
    """
    return {
        "format": PROJECT_FORMAT,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "model_label": describe_model(model_name, model_kwargs),
        "params": count_params(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def save_model(
    path: str | os.PathLike, model: nn.Module, model_name: str, model_kwargs: dict[str, Any],
    dtype: torch.dtype | None = None, **extra: Any
) -> Path:
    """Atomically save a :func:`model_checkpoint`.

    A ``.safetensors`` path writes the tensors (floating ones cast to ``dtype`` when given, e.g. ``torch.float16``
    for half the size) with the rest as JSON metadata; :func:`load_model` reads both forms.
    """
    checkpoint = model_checkpoint(model, model_name, model_kwargs, **extra)
    if Path(path).suffix != ".safetensors":
        return atomic_torch_save(checkpoint, path)
    from safetensors.torch import save

    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in checkpoint.pop("state_dict").items()}
    metadata = {key: json.dumps(value) for key, value in checkpoint.items()}
    return atomic_write(path, lambda handle: handle.write(save(tensors, metadata)))


def read_model_file(path: str | os.PathLike) -> Any:
    """The content of a checkpoint: a timm hub folder (a directory with ``config.json``, or ``local-dir:PATH``) or
    a project ``.safetensors`` file as a project checkpoint dict (tensors under ``state_dict``), any other
    ``.safetensors`` file as ``{"state_dict": tensors, **its metadata}``, anything else through
    :func:`fcaformer.checkpoint.read_checkpoint`."""
    from .hub import hub_folder, read_hub_folder  # the hub module builds on this one

    folder = hub_folder(path)
    if folder is not None:
        return read_hub_folder(folder)
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        state_dict, metadata = read_safetensors(path)
        return {**metadata, "state_dict": state_dict}
    return read_checkpoint(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a ``.safetensors`` file. Metadata values that are JSON (as :func:`save_model` writes
    them) are decoded; others (e.g. ``{"format": "pt"}`` of files written by other tools) stay strings."""
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
        raise CheckpointError(f"cannot read {path} as a safetensors file (truncated or corrupt?): {error}") from error
    return state_dict, {key: _json_or_text(value) for key, value in metadata.items()}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(checkpoint: str | os.PathLike | dict[str, Any], **overrides: Any) -> tuple[nn.Module, dict]:
    """Rebuild and load a model saved with :func:`save_model` (``.pt`` or ``.safetensors``) or written as a timm
    hub folder (``fcaformer convert``); returns ``(model in eval mode, checkpoint)``.

    ``overrides`` change constructor arguments, not the architecture (``img_size`` or ``window_size`` resize the
    grid-sized parameters). Loading is all-or-nothing.
    """
    raw = read_model_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(raw, dict) or raw.get("format") != PROJECT_FORMAT:
        raise CheckpointError(
            f"not an fcaformer project checkpoint (no format={PROJECT_FORMAT!r}); "
            "for the authors' release checkpoints use fcaformer.load_official"
        )
    import fcaformer  # noqa: F401  (registers the models)

    model = timm.create_model(raw["model_name"], **{**raw["model_kwargs"], **overrides})
    load_state_dict_strict(model, resize_grid_parameters(raw["state_dict"], model))
    return model.eval(), raw
