"""Loading pretrained weights into a freshly built model to fine-tune it.

The weights come from any source :func:`fcaformer.weights.read_weights` reads. The trunk must match the model
exactly (after grid-sized parameters are resized to the model's training size), the classifier is re-initialised
when the classes differ, and the report says what was loaded, resized, re-initialised and left unused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, name_list
from ..models.state_dicts import resize_grid_parameters
from .load import read_weights
from .record import WeightsRecord


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
    weights: WeightsRecord | str | os.PathLike,
    class_names: Sequence[str] | None = None,
    head_init_scale: float = 1.0,
    model_label: str | None = None,
) -> PretrainedReport:
    """Load pretrained weights into a freshly built ``model`` to fine-tune it.

    - Grid-sized parameters (relative-position tables, cross-token biases and LSFs, L0's position embedding) are
      resized from the checkpoint's training size to the model's
      (:func:`~fcaformer.models.state_dicts.resize_grid_parameters`).
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
    if not isinstance(weights, WeightsRecord):
        weights = read_weights(weights)
    if weights.state_dict is None:
        raise CheckpointError(f"{weights.label} is a model name, not weights: pass a checkpoint to fine-tune from")
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
