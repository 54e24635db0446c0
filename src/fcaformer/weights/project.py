"""The project's own checkpoint format: a self-describing file (``model.pt`` or ``.safetensors``) that holds the
weights with the registered model name and arguments that rebuild the network, and what the run recorded
(class names, preprocessing, metrics)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_torch_save, atomic_write
from ..models.names import describe_model
from ..profile import count_params
from .record import WeightsRecord

PROJECT_FORMAT = "fcaformer-checkpoint-v1"
"""``format`` entry of a project checkpoint."""
_DESCRIBED = ("format", "model_name", "model_kwargs", "state_dict", "class_names", "data_config")


def is_project_checkpoint(raw: Any) -> bool:
    """Whether ``raw`` (a file's content) is a project checkpoint."""
    return isinstance(raw, Mapping) and raw.get("format") == PROJECT_FORMAT


def model_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict[str, Any], **extra: Any) -> dict:
    """A self-describing checkpoint: enough to rebuild ``model`` from the file alone.

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
    for half the size) with the rest as JSON metadata; :func:`fcaformer.weights.read_weights` reads both forms.
    """
    checkpoint = model_checkpoint(model, model_name, model_kwargs, **extra)
    if Path(path).suffix != ".safetensors":
        return atomic_torch_save(checkpoint, path)
    from safetensors.torch import save

    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in checkpoint.pop("state_dict").items()}
    metadata = {key: json.dumps(value) for key, value in checkpoint.items()}
    return atomic_write(path, lambda handle: handle.write(save(tensors, metadata)))


def project_record(raw: Mapping[str, Any], **provenance: Any) -> WeightsRecord:
    """A project checkpoint's content as a record (its other entries, e.g. ``train_config``, under ``info``)."""
    names = raw.get("class_names")
    return WeightsRecord(
        dict(raw["state_dict"]), "project checkpoint", model_name=raw["model_name"],
        model_kwargs=dict(raw["model_kwargs"]), class_names=list(names) if names else None,
        data_config=raw.get("data_config"), info={k: v for k, v in raw.items() if k not in _DESCRIBED}, raw=raw,
        **provenance,
    )
