"""Training states (``checkpoints/state-*.pt`` of ``fcaformer train``): the format tag, reading one with its format
checked, and its evaluation weights as a record (the EMA when the run kept one, as ``model.pt`` would)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..models.state_dicts import unwrap_state_dict
from .reading import read_torch_file
from .record import WeightsRecord, preprocessing_config

STATE_FORMAT = "fcaformer-train-state-v1"
"""``format`` entry of a training state."""


def is_training_state(raw: Any) -> bool:
    """Whether ``raw`` (a file's content) is a training state."""
    return isinstance(raw, Mapping) and raw.get("format") == STATE_FORMAT


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """A training state file's content, for resuming.

    Raises:
        FileNotFoundError, CheckpointError: unreadable, or not a training state.
    """
    raw = read_torch_file(path)
    if not is_training_state(raw):
        raise CheckpointError(f"{path} is not a training state (format {STATE_FORMAT!r} missing)")
    return raw


def state_record(raw: Mapping[str, Any], **provenance: Any) -> WeightsRecord:
    """A training state's evaluation weights as a record."""
    weights = raw["ema"] if raw.get("ema") is not None else raw["model"]
    data_config = preprocessing_config((raw.get("config") or {}).get("data") or {})
    return WeightsRecord(
        unwrap_state_dict(weights), "training state", model_name=raw.get("model_name"),
        model_kwargs=dict(raw.get("model_kwargs") or {}), class_names=raw.get("class_names"),
        data_config=data_config or None, info={"train_config": raw.get("config"), "pretrained": raw.get("pretrained")},
        raw=raw, **provenance,
    )
