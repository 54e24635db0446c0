"""Pretrained weights from any source the project reads, and loading them into a model to fine-tune it.

Sources (:func:`read_pretrained`): a release classification checkpoint (``.pth``; also mmdet/mmseg backbones), a
project checkpoint (``model.pt`` or ``.safetensors`` from ``fcaformer train``), a training state
(``checkpoints/state-*.pt``: its EMA weights when it has them, as ``model.pt`` would), a ``.safetensors`` or torch
state-dict file, a timm hub folder (a directory with ``config.json``, or ``local-dir:PATH``), or ``hf-hub:NAME``
(handed to timm, which downloads it).

:func:`load_pretrained` loads them for fine-tuning: the trunk must match the model exactly (after grid-sized
parameters are resized to the model's training size), the classifier is re-initialised when the classes differ,
and the report says what was loaded, resized, re-initialised and left unused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    StateDict,
    convert_release_state_dict,
    infer_release_config,
    is_release_layout,
    name_list,
    release_architecture,
    release_data_config,
    resize_grid_parameters,
    unwrap_state_dict,
)
from .hub import HF_PREFIX, HUB_ORIGIN, hub_folder, hub_weights_file, read_hub_folder
from .io import PROJECT_FORMAT, file_sha256, path_label, read_model_file
from .models.names import describe_model


@dataclass
class PretrainedWeights:
    """Weights in this project's key layout, with what the source says about them."""

    state_dict: StateDict
    kind: str
    """``"release checkpoint"``, ``"release dense backbone"``, ``"project checkpoint"``, ``"training state"``,
    ``"timm hub folder"``, ``"state dict"`` or ``"hf-hub model"``."""
    label: str
    """The source as recorded in written files: its last two path components (or the hub name)."""
    model_name: str | None = None
    model_kwargs: dict[str, Any] | None = None
    class_names: list[str] | None = None
    data_config: dict[str, Any] | None = None
    sha256: str | None = None
    raw: Any = field(default=None, repr=False)
    """The checkpoint as read (to rebuild the source model the way the project loads it)."""

    @property
    def architecture(self) -> str | None:
        """The network the weights are for (:func:`~fcaformer.models.names.describe_model`), when known."""
        return describe_model(self.model_name, self.model_kwargs) if self.model_name else None


PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")


def preprocessing_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing a checkpoint records: the :data:`PREPROCESSING_KEYS` entries of a training
    run's ``data`` config that are present (mean and std as lists)."""
    return {k: list(data[k]) if k in ("mean", "std") else data[k] for k in PREPROCESSING_KEYS if k in data}


def read_pretrained(source: str | os.PathLike, use_ema: bool = False) -> PretrainedWeights:
    """Read pretrained weights from any source (see the module docstring).

    Args:
        source: a path, ``local-dir:PATH`` or ``hf-hub:NAME``.
        use_ema: release checkpoints: take ``model_ema`` when present.

    Raises:
        FileNotFoundError: a path that does not exist.
        CheckpointError: an unreadable file, or one without tensors.
    """
    from .train.state import STATE_FORMAT  # the training package builds on this module

    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        return _from_timm(text)
    folder = hub_folder(source)
    raw = read_hub_folder(folder) if folder is not None else read_model_file(source)
    path = hub_weights_file(folder) if folder is not None else Path(text)
    label, sha256 = path_label(folder if folder is not None else path), file_sha256(path)
    if isinstance(raw, Mapping) and raw.get("format") == PROJECT_FORMAT:
        kind = "timm hub folder" if raw.get("origin") == HUB_ORIGIN else "project checkpoint"
        return PretrainedWeights(dict(raw["state_dict"]), kind, label, raw["model_name"], dict(raw["model_kwargs"]),
                                 raw.get("class_names"), raw.get("data_config"), sha256, raw)
    if isinstance(raw, Mapping) and raw.get("format") == STATE_FORMAT:
        # the evaluation weights, as model.pt holds them: the EMA when the run kept one
        weights = raw["ema"] if raw.get("ema") is not None else raw["model"]
        data_config = preprocessing_config((raw.get("config") or {}).get("data") or {})
        return PretrainedWeights(unwrap_state_dict(weights), "training state", label, raw.get("model_name"),
                                 dict(raw.get("model_kwargs") or {}), raw.get("class_names"), data_config or None,
                                 sha256, raw)
    state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    if not is_release_layout(state_dict):
        return PretrainedWeights(state_dict, "state dict", label, sha256=sha256, raw=raw)
    config = infer_release_config(state_dict)
    if config["windowed"]:
        return PretrainedWeights(convert_release_state_dict(state_dict), "release dense backbone", label,
                                 sha256=sha256, raw=raw)
    name, kwargs = release_architecture(config)
    return PretrainedWeights(convert_release_state_dict(state_dict), "release checkpoint", label, name, kwargs,
                             data_config=release_data_config(kwargs["img_size"]), sha256=sha256, raw=raw)


def _from_timm(name: str) -> PretrainedWeights:
    """``hf-hub:NAME``: timm builds the model and downloads its weights; its config says what it is."""
    from .hub import create_from_hf_hub, data_config_from_pretrained_cfg

    model = create_from_hf_hub(name)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    kwargs = {**(getattr(model, "pretrained_model_args", None) or {}), "num_classes": model.num_classes}
    labels = cfg.get("label_names")
    return PretrainedWeights(model.state_dict(), "hf-hub model", name, cfg.get("architecture"), kwargs,
                             list(labels) if labels else None, data_config_from_pretrained_cfg(cfg))


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did (also stored in ``results.json`` and the training states)."""

    source: str
    kind: str
    architecture: str | None
    loaded: int
    """Model tensors set from the checkpoint."""
    total: int
    """Model tensors in all."""
    reinitialised: list[str] = field(default_factory=list)
    """Model tensors kept at their fresh initialisation (the classifier when the classes differ)."""
    reinit_reason: str | None = None
    head_init_scale: float = 1.0
    resized: list[str] = field(default_factory=list)
    """Grid-sized tensors resized from the checkpoint's training size to the model's."""
    unused: list[str] = field(default_factory=list)
    """Checkpoint tensors the model has no place for (another head, e.g. a dense backbone's projections)."""
    sha256: str | None = None

    def summary(self) -> str:
        """One line: counts and first names of everything that was not a plain copy."""
        what = f"{self.source} ({self.kind}{', ' + self.architecture if self.architecture else ''})"
        parts = [f"pretrained weights from {what}: loaded {self.loaded} of {self.total} tensors"]
        if self.reinitialised:
            scale = f", initial weights x {self.head_init_scale:g}" if self.head_init_scale != 1 else ""
            parts.append(f"re-initialised {len(self.reinitialised)} ({self.reinit_reason}{scale}): "
                         f"{name_list(self.reinitialised, 4)}")
        if self.resized:
            parts.append(f"resized {len(self.resized)} grid-sized tensors to this training size: "
                         f"{name_list(self.resized, 3)}")
        parts.append(f"{len(self.unused)} checkpoint tensors unused" +
                     (f": {name_list(self.unused, 4)}" if self.unused else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classifier_prefixes(model: nn.Module) -> tuple[str, str]:
    """``(classifier, head)`` key prefixes: the classifier named by the model's timm config (``head.fc.``) and the
    head module around it (``head.``: its pre-logits norm too), which may be missing from a checkpoint."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head.fc"
    parent = classifier.rpartition(".")[0]
    return f"{classifier}.", f"{parent or classifier}."


def load_pretrained(
    model: nn.Module,
    weights: PretrainedWeights | str | os.PathLike,
    class_names: Sequence[str] | None = None,
    head_init_scale: float = 1.0,
    model_label: str | None = None,
) -> PretrainedReport:
    """Load pretrained weights into a freshly built ``model`` to fine-tune it.

    - Grid-sized parameters (relative-position tables, cross-token biases and LSFs, L0's position embedding) are
      resized from the checkpoint's training size to the model's (:func:`~fcaformer.checkpoint.resize_grid_parameters`).
    - The trunk (everything outside the head module) must match exactly: a model tensor missing from the checkpoint,
      one of another shape, or a checkpoint tensor under one of the model's own top-level modules that the model
      lacks (a deeper stage, cross-attention parameters of a model without them) means another architecture, and
      nothing is loaded.
    - The classifier keeps its fresh initialisation, scaled by ``head_init_scale`` (as the authors' fine-tuning
      does), when its shape differs (another class count), when the checkpoint has none, or when the checkpoint
      records class names that differ from ``class_names`` (same count, other classes). The rest of the head (its
      norm) loads when present.
    - Checkpoint tensors outside the model's modules (e.g. a dense backbone's projections) are reported as unused.

    Raises:
        CheckpointError: another architecture (with the first offending names), or an unreadable source.
    """
    if not isinstance(weights, PretrainedWeights):
        weights = read_pretrained(weights)
    expected = model.state_dict()
    state_dict = resize_grid_parameters(weights.state_dict, model)
    resized = [k for k in state_dict if k in expected and weights.state_dict[k].shape != state_dict[k].shape
               and state_dict[k].shape == expected[k].shape]
    classifier, head = classifier_prefixes(model)
    fits = lambda k: k in state_dict and state_dict[k].shape == expected[k].shape  # noqa: E731
    trunk = [k for k in expected if not k.startswith(head)]
    missing = [k for k in trunk if k not in state_dict]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in trunk if k in state_dict and not fits(k)]
    top_level = {k.split(".")[0] for k in expected}
    unused = [k for k in state_dict if k not in expected]
    foreign = [k for k in unused if k.split(".")[0] in top_level and not k.startswith(head)]
    target = model_label or type(model).__name__
    if missing or mismatched or foreign:
        problems = [f"{len(items)} {label}: {name_list(items, 4)}" for label, items in (
            ("model tensors missing from the checkpoint", missing), ("of another shape", mismatched),
            ("checkpoint tensors the model has no place for", foreign)) if items]
        holds = f" holds {weights.architecture}" if weights.architecture else f" is a {weights.kind}"
        raise CheckpointError(
            f"{weights.label}{holds}, another architecture than {target}; nothing was loaded ("
            + "; ".join(problems) + "). Train the checkpoint's architecture (--model / model.kwargs)"
        )
    classifier_keys = [k for k in expected if k.startswith(classifier)]
    reason = None
    if any(k not in state_dict for k in classifier_keys):
        reason = "the checkpoint has no classifier"
    elif not all(fits(k) for k in classifier_keys):
        key = f"{classifier}weight"
        reason = (f"the checkpoint has {state_dict[key].shape[0]} classes, this model {expected[key].shape[0]}"
                  if key in state_dict and state_dict[key].ndim and expected[key].ndim else "another classifier shape")
    elif weights.class_names and class_names and list(weights.class_names) != list(class_names):
        reason = (f"the checkpoint's classes {name_list(weights.class_names, 3)} are not this dataset's "
                  f"{name_list(list(class_names), 3)}")
    reinit = classifier_keys if reason else []
    reinit += [k for k in expected if k.startswith(head) and k not in classifier_keys and not fits(k)]
    load = {k: state_dict[k] for k in expected if k not in reinit}
    model.load_state_dict(load, strict=False)  # strict=False: exactly the re-initialised tensors stay as built
    if reason and head_init_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith(classifier):
                    param.mul_(head_init_scale)
    return PretrainedReport(
        source=weights.label, kind=weights.kind, architecture=weights.architecture, loaded=len(load),
        total=len(expected), reinitialised=reinit,
        reinit_reason=reason or ("the checkpoint has no head" if reinit else None),
        head_init_scale=head_init_scale, resized=resized, unused=unused, sha256=weights.sha256,
    )
