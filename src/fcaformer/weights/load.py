"""The one way in for weights: :func:`read_weights` recognises every source the project supports and returns one
:class:`~fcaformer.weights.record.WeightsRecord`; every command and API that reads weights calls it.

It only decides which format a source is in; each format is a module of its own below it (:mod:`.release`,
:mod:`.project`, :mod:`.training_state`, :mod:`.hub`), and the file readers (:mod:`.reading`) know no format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg_value
from torch import nn

from ..errors import CheckpointError
from ..files import file_sha256, path_label
from ..models.state_dicts import is_release_layout, unwrap_state_dict
from .hub import HF_PREFIX, hf_hub_record, hub_folder, hub_folder_record
from .project import is_project_checkpoint, project_record
from .reading import read_checkpoint_file
from .record import WeightsRecord
from .release import release_record
from .training_state import is_training_state, state_record

Source = str | os.PathLike | Mapping[str, Any]


def read_weights(
    source: Source,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = False,
) -> WeightsRecord:
    """Read weights from any source the project supports.

    Args:
        source: a path to a release checkpoint (``.pth``; mmdet/mmseg checkpoints give their backbone), a project
            checkpoint (``model.pt`` or ``.safetensors`` from ``fcaformer train``), a training state
            (``checkpoints/state-*.pt``: its EMA weights when it has them), a bare state dict (torch or
            safetensors file), or a timm hub folder (a folder with ``config.json``, or ``local-dir:PATH``);
            ``hf-hub:ORG/NAME`` (timm downloads it); a registered model name (random weights); or a checkpoint
            already loaded into memory.
        model_name: the network the weights are for, where the source does not say it (a bare state dict); it
            replaces what the source says. Its class count is read off the classifier unless ``model_kwargs``
            gives ``num_classes``.
        model_kwargs: constructor arguments added to the source's (with ``model_name``: replacing them).
        use_ema: release checkpoints: take ``model_ema`` when present.

    Raises:
        FileNotFoundError: a path that does not exist (and is no model name).
        CheckpointError: an unreadable or damaged file, or content that is not a checkpoint; the same message
            wherever it is read.
    """
    record = _read(source, use_ema)
    if model_name is not None:
        if not timm.is_model(model_name):
            raise CheckpointError(f"unknown model {model_name!r} (see timm.list_models())")
        record.model_name, record.model_kwargs, record.builder = model_name, dict(model_kwargs or {}), None
        if "num_classes" not in record.model_kwargs and record.state_dict is not None:
            classifier = get_pretrained_cfg_value(model_name, "classifier") or "head.fc"
            head = record.state_dict.get(f"{classifier}.weight")
            if head is not None:
                record.model_kwargs["num_classes"] = int(head.shape[0])
    elif model_kwargs:
        record.model_kwargs = {**record.model_kwargs, **model_kwargs}
    return record


def _read(source: Source, use_ema: bool) -> WeightsRecord:
    if isinstance(source, Mapping):
        return record_from_checkpoint(source, use_ema=use_ema, label="checkpoint in memory")
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        return hf_hub_record(text)
    folder = hub_folder(text)
    if folder is not None:
        return hub_folder_record(folder)
    path = Path(text)
    if path.is_file():
        return record_from_checkpoint(read_checkpoint_file(path), use_ema=use_ema, label=path_label(path),
                                      path=path, sha256=file_sha256(path))
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file or a timm hub folder (a folder with config.json), got a "
                              f"folder without config.json: {path}")
    if not path.suffix and os.sep not in text and timm.is_model(text):
        return WeightsRecord(None, "timm model", text, model_name=text)
    name_hint = "" if path.suffix or os.sep in text else " (nor a registered model name: see timm.list_models())"
    raise FileNotFoundError(f"checkpoint not found: {path}{name_hint}")


def record_from_checkpoint(raw: Any, *, label: str, use_ema: bool = False, **provenance: Any) -> WeightsRecord:
    """A checkpoint's content (as a file holds it) as a record, whichever format it is in."""
    provenance = {"label": label, **provenance}
    if is_project_checkpoint(raw):
        return project_record(raw, **provenance)
    if is_training_state(raw):
        return state_record(raw, **provenance)
    try:
        state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{label} is not an fcaformer project checkpoint, training state or hub folder, nor "
                              f"a state dict: {error}") from error
    if is_release_layout(state_dict):
        return release_record(state_dict, raw=raw, **provenance)
    return WeightsRecord(state_dict, "state dict", raw=raw, **provenance)


def load_official(checkpoint: Source, use_ema: bool = False, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint describes and load it, in eval mode.

    Args:
        checkpoint: a path (``.pth``, a ``.safetensors`` file, or a timm hub folder / ``local-dir:PATH`` as
            ``fcaformer convert`` writes), or an already loaded checkpoint (bare state_dict or wrapped in ``model``,
            ``model_ema`` or ``state_dict``; mmdet/mmseg ``backbone.`` prefixes are stripped); anything
            :func:`read_weights` reads that holds weights. The architecture of a release checkpoint is inferred
            from its tensors; self-describing files are rebuilt from what they record.
        use_ema: take ``model_ema`` when the checkpoint has it.
        overrides: constructor arguments to change (e.g. ``drop_path_rate`` for fine-tuning, or ``img_size`` /
            ``window_size``: grid-sized parameters are then resized).

    Returns:
        an :class:`~fcaformer.models.FcaFormer` computing the release's logits, or, for a windowed dense
        backbone checkpoint, an :class:`~fcaformer.models.FcaFormerDense` returning its four feature maps.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: unreadable file, not an FcaFormer checkpoint, or tensors that do not fit.
    """
    record = read_weights(checkpoint, use_ema=use_ema)
    if record.state_dict is None:
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return record.build(**overrides)


def load_model(checkpoint: Source, **overrides: Any) -> tuple[nn.Module, Any]:
    """Rebuild and load a self-describing checkpoint: a project checkpoint (``model.pt`` / ``.safetensors`` of
    :func:`~fcaformer.weights.project.save_model`) or a timm hub folder; returns ``(model in eval mode, the
    content as read)``.

    ``overrides`` change constructor arguments, not the architecture (``img_size`` or ``window_size`` resize the
    grid-sized parameters). Loading is all-or-nothing.

    Raises:
        CheckpointError: another kind of checkpoint (for the authors' release checkpoints use :func:`load_official`).
    """
    record = read_weights(checkpoint)
    if record.kind not in ("project checkpoint", "timm hub folder"):
        raise CheckpointError(
            f"{record.label} is not an fcaformer project checkpoint (no format='fcaformer-checkpoint-v1') but a "
            f"{record.kind}; for the authors' release checkpoints use fcaformer.load_official"
        )
    return record.build(**overrides), record.raw
