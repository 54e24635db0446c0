"""``fcaformer convert``: any weights the project reads, written as a timm hub folder whose logits are measured
against the source's before it is published."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import CheckpointError
from ..files import atomic_json_dump
from ..models.state_dicts import load_state_dict_strict
from ..profile import count_macs, count_params
from .hub import LOCAL_PREFIX, RECORD_KEY, data_config_from_pretrained_cfg, write_hub_folder
from .load import read_weights
from .record import WeightsRecord

PARITY_TOLERANCE = 1e-6
"""Largest relative L2 difference between the folder's and the source's logits that :func:`convert_to_hub`
accepts."""

@dataclass
class ConvertReport:
    """What :func:`convert_to_hub` wrote and measured."""

    out_dir: str
    source: str
    source_kind: str
    source_sha256: str | None
    model: str
    architecture: str
    model_args: dict[str, Any]
    params: int
    macs: int
    img_size: int
    max_abs_diff: float
    relative_diff: float
    tag: str = ""
    """timm's pretrained tag of the folder (``in1k`` for the release; the training data's name otherwise)."""
    training: dict[str, Any] = field(default_factory=dict)
    """What the weights were trained on and how well they did, as far as the source records it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(model: nn.Module, img_size: int, in_chans: int) -> torch.Tensor:
    """Eval-mode outputs for two fixed random images (seeded; the same for every call)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, in_chans, img_size, img_size, generator=generator)
    with torch.no_grad():
        return model.eval()(images).float()


def convert_to_hub(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = False,
    overwrite: bool = False,
) -> ConvertReport:
    """Convert a checkpoint into a timm hub folder whose ``timm.create_model("local-dir:OUT_DIR", pretrained=True)``
    computes what the source computes.

    ``source`` is anything :func:`fcaformer.weights.read_weights` reads: a release classification
    checkpoint, a project checkpoint (``model.pt``, ``.safetensors``), a training state, another hub folder, or a
    bare state dict in this project's layout (then ``model_name``, and ``model_kwargs`` such as ``img_size``, say
    what to build). The folder's preprocessing is the release's (:func:`fcaformer.weights.release.release_data_config`)
    for release checkpoints and the recorded one for project checkpoints.

    Before the folder is published it is loaded back through timm and its logits are compared with the source's
    as this project loads it (faithful path, float32, two seeded random images at the folder's input size); the
    difference goes into the model card and ``config.json``, and a relative difference above
    :data:`PARITY_TOLERANCE` is an error that publishes nothing.

    Raises:
        FileNotFoundError, CheckpointError: an unreadable source, one that does not say its architecture while
            ``model_name`` is not given, or weights that do not fit.
        FileExistsError: ``out_dir`` exists and is not empty (``overwrite`` replaces it).
    """
    record = read_weights(source, model_name=model_name, model_kwargs=model_kwargs, use_ema=use_ema)
    if record.kind == "release dense backbone":
        raise CheckpointError(f"{record.label} is a dense-prediction backbone (no classifier): only classification "
                              "checkpoints become timm models")
    if record.state_dict is None:
        raise CheckpointError(f"{record.label} is a model name, not weights: pass a checkpoint to convert")
    if record.model_name is None:
        raise CheckpointError(f"{record.label} is a bare state dict that does not say which network it holds; "
                              "pass the model name (fcaformer convert --model NAME)")
    name, kwargs = record.model_name, record.model_kwargs
    model = timm.create_model(name, **kwargs)
    load_state_dict_strict(model, record.state_dict)
    model.eval()
    data_config = dict(record.data_config or _model_data_config(model))
    size, in_chans = int(data_config["img_size"]), int(getattr(model, "in_chans", 3))
    # The reference is the source as the project loads it everywhere else (release: its own construction).
    reference = record.build()
    expected = _logits(reference, size, in_chans)
    measured: dict[str, float] = {}

    def card(folder: Path) -> str:
        try:
            loaded = timm.create_model(f"{LOCAL_PREFIX}{folder}", pretrained=True)
        except (TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"the written folder does not load back through timm ({error}); nothing written") \
                from error
        got = _logits(loaded, size, in_chans)
        measured["max_abs_diff"] = (got - expected).abs().max().item()
        measured["relative_diff"] = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if measured["relative_diff"] > PARITY_TOLERANCE:
            raise CheckpointError(f"the written folder computes other logits than {record.label} (relative "
                                  f"difference {measured['relative_diff']:.2e} > {PARITY_TOLERANCE}); nothing written")
        _record_parity(folder, measured)
        return model_card(report())

    architecture = record.architecture
    params, macs = count_params(model), count_macs(model, (1, in_chans, size, size))
    training = training_record(record)
    tag = training.pop("tag")
    # timm's default cfg says what the registered variant was pretrained on (in1k, 224 px): say what these are
    # the registered name rebuilds the model: fca_any keeps its base's cfg, whose architecture is the base's
    cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}), "architecture": name, "tag": tag}
    cfg.pop("pool_size", None)
    model.pretrained_cfg = {**cfg, **_pool_size(model, in_chans, size)}

    def report() -> ConvertReport:
        return ConvertReport(
            out_dir=str(out_dir), source=record.label, source_kind=record.kind, source_sha256=record.sha256,
            model=name, architecture=architecture, model_args=dict(kwargs), params=params, macs=macs, img_size=size,
            tag=tag, training=training, **measured,
        )

    provenance = {"source": record.label, "source_kind": record.kind, "source_sha256": record.sha256,
                  "architecture": architecture, "training": training}
    write_hub_folder(model, out_dir, model_args=kwargs, data_config=data_config, label_names=record.class_names,
                     record=provenance, card=card, overwrite=overwrite)
    return report()


def _record_parity(folder: Path, measured: Mapping[str, float]) -> None:
    """Add the measured parity to the ``"fcaformer"`` record of the folder's ``config.json``."""
    config = json.loads((folder / "config.json").read_text())
    config.setdefault(RECORD_KEY, {})["parity"] = {
        **measured, "tolerance": PARITY_TOLERANCE,
        "measured_on": "2 seeded random images, float32, CPU, faithful path of the source vs timm's local-dir load",
    }
    atomic_json_dump(config, folder / "config.json")


def training_record(record: WeightsRecord) -> dict[str, Any]:
    """What the source says about its training data and accuracy (``tag``: a timm pretrained tag for it)."""
    if record.release_preprocessing:
        return {"tag": "in1k", "data": "ImageNet-1k (the authors' release)",
                "accuracy": "not measured by this project (paper: see the model zoo of the fcaformer README)"}
    config = record.info.get("train_config") or {}
    data = config.get("data") or {}
    if not data:
        return {"tag": "custom", "data": "not recorded by the source"}
    dataset = data.get("dataset", "?")
    name = dataset if dataset in ("digits", "cifar10", "cifar100") else Path(str(data.get("root") or dataset)).name
    out: dict[str, Any] = {
        "tag": re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "custom",
        "data": f"{dataset} {name!r}" if name != dataset else dataset,
        "classes": len(record.class_names) if record.class_names else None,
        "img_size": data.get("img_size"),
        "epochs": (config.get("run") or {}).get("epochs"),
    }
    if (config.get("model") or {}).get("pretrained"):
        out["fine_tuned_from"] = config["model"]["pretrained"]
    metrics = record.info.get("metrics") or {}
    if metrics.get("val_top1") is not None:
        top5 = metrics.get("val_top5", float("nan"))
        out["accuracy"] = (f"val top-1 {metrics['val_top1']:.2f} %, top-5 {top5:.2f} % after epoch "
                           f"{metrics.get('epoch', '?')} (as recorded by fcaformer train)")
    return out


def _pool_size(model: nn.Module, in_chans: int, size: int) -> dict[str, Any]:
    """timm's ``pool_size`` (the final feature map's size) at the folder's input size; none for token outputs."""
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, in_chans, size, size))
    return {"pool_size": tuple(features.shape[-2:])} if features.ndim == 4 else {}


def _model_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing of a timm model's ``pretrained_cfg`` at its native size, in data-config form."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    # FcaFormers say their size; timm's ViTs and Swins (converted ones too) say it in their patch embedding
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        side = size if isinstance(size, int) else size[-1]
        cfg["input_size"] = (getattr(model, "in_chans", 3), side, side)
    return data_config_from_pretrained_cfg(cfg)


def model_card(report: ConvertReport) -> str:
    """The ``README.md`` of a converted folder: what it is, its size and cost, where it came from, how it loads."""
    gmacs = report.macs / 1e9
    sha = report.source_sha256 or "n/a (not a single file)"
    training = report.training
    details = [f"{training[k]} {label}" for k, label in (("classes", "classes"), ("img_size", "px"),
                                                          ("epochs", "epochs")) if training.get(k)]
    if training.get("fine_tuned_from"):
        details.append(f"fine-tuned from `{training['fine_tuned_from']}`")
    extra = f" ({', '.join(details)})" if details else ""
    return f"""---
library_name: timm
tags:
- image-classification
- timm
- fcaformer
---

# {report.architecture}

FcaFormer (forward cross attention in a hybrid vision transformer, [arXiv 2211.07198](https://arxiv.org/abs/2211.07198))
as a timm model, converted by `fcaformer convert` from `{report.source}` ({report.source_kind}).

| | |
|---|---|
| architecture | `{report.model}` with `model_args` {json.dumps(report.model_args)} |
| params | {report.params / 1e6:.3f} M |
| MACs | {gmacs:.4f} G at {report.img_size}x{report.img_size} (batch 1, MACs = FLOPs / 2) |
| source file | `{report.source}`, sha256 `{sha}` |
| training data | {training.get("data", "not recorded")}{extra} |
| accuracy | {training.get("accuracy", "not recorded by the source")} |
| parity | logits of this folder loaded by timm vs the source loaded by fcaformer: max abs difference \
{report.max_abs_diff:.3g}, relative L2 difference {report.relative_diff:.3g} (2 seeded random \
{report.img_size}x{report.img_size} images, float32, CPU) |

## Use

```python
import timm
import fcaformer  # registers the FcaFormer architectures with timm

model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)   # the preprocessing recorded in config.json
transform = timm.data.create_transform(**config)
```

Fine-tune it: `fcaformer train --data ROOT --model {report.model} --pretrained local-dir:PATH/TO/THIS/FOLDER`.
"""
