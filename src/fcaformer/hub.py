"""timm hub folders: the layout in which timm users share weights.

A hub folder holds ``config.json`` (timm's ``save_for_hf`` form: ``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg`` with the preprocessing), the weights (``model.safetensors``) and a model card (``README.md``).
timm builds it with ``timm.create_model("local-dir:PATH", pretrained=True)`` (``hf-hub:ORG/NAME`` once uploaded to
the Hugging Face Hub), after ``import fcaformer`` has registered the architectures.

This module reads such folders as project checkpoints (so everything that loads a ``model.pt`` loads them) and
writes them, all or nothing, with timm's own writer. :func:`convert_to_hub` turns any checkpoint the project reads
into one and measures that timm computes what the source computes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn

from .checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, unwrap_state_dict

LOCAL_PREFIX = "local-dir:"
"""timm's model-name prefix for a hub folder on the local file system."""
HF_PREFIX = "hf-hub:"
"""timm's model-name prefix for a model on the Hugging Face Hub (downloaded by timm; nothing here downloads)."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
"""Weight files of a hub folder, in timm's order of preference."""
HUB_ORIGIN = "timm-hub-folder"
"""``origin`` of a project checkpoint dict read from a hub folder."""
RECORD_KEY = "fcaformer"
"""Top-level ``config.json`` entry where :func:`convert_to_hub` records the source and the measured parity (timm
ignores top-level entries it does not know)."""
PARITY_TOLERANCE = 1e-6
"""Largest relative L2 difference between the folder's and the source's logits that :func:`convert_to_hub`
accepts."""


def hub_folder(source: str | os.PathLike) -> Path | None:
    """The folder ``source`` names when it is a hub folder: ``local-dir:PATH``, or a directory with a
    ``config.json``; ``None`` for anything else.

    Raises:
        FileNotFoundError: ``local-dir:PATH`` whose folder does not exist.
        CheckpointError: ``local-dir:PATH`` that is not a folder with a ``config.json``.
    """
    text = os.fspath(source)
    explicit = text.startswith(LOCAL_PREFIX)
    folder = Path(text.removeprefix(LOCAL_PREFIX))
    if (folder / "config.json").is_file():
        return folder
    if not explicit:
        return None
    if not folder.exists():
        raise FileNotFoundError(f"hub folder not found: {folder}")
    raise CheckpointError(f"{folder} is not a timm hub folder (no config.json in it)")


def hub_weights_file(folder: Path) -> Path:
    """The weights file of a hub folder (``model.safetensors`` first, as timm chooses)."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"hub folder {folder} has no weights file (expected one of {list(WEIGHT_FILES)})")
    return found


def read_hub_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """A hub folder as a project checkpoint dict (see :func:`fcaformer.io.load_model`): ``model_name`` from
    ``architecture``, ``model_kwargs`` from ``model_args`` and ``num_classes``, ``class_names`` from
    ``label_names``, ``data_config`` from ``pretrained_cfg``; ``origin`` says where it came from and ``record``
    holds what :func:`convert_to_hub` recorded (source, parity), if anything.

    Raises:
        CheckpointError: an unreadable ``config.json`` or weights file, or a config without ``architecture``.
    """
    from .io import PROJECT_FORMAT, read_safetensors

    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config_path} as a timm config: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a timm config (a JSON object was expected)")
    # timm's current form nests pretrained_cfg; its older single-dict form has the keys at the top level
    pretrained_cfg = dict(config["pretrained_cfg"]) if isinstance(config.get("pretrained_cfg"), dict) else config
    architecture = config.get("architecture", pretrained_cfg.get("architecture"))
    if not isinstance(architecture, str):
        raise CheckpointError(f"{config_path} names no architecture (key 'architecture')")
    weights = hub_weights_file(folder)
    state_dict = read_safetensors(weights)[0] if weights.suffix == ".safetensors" else read_checkpoint(weights)
    kwargs = dict(config.get("model_args") or {})
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    labels = config.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(labels, dict):  # timm allows {index: name} when indices have gaps
        labels = [labels[k] for k in sorted(labels, key=int)]
    return {
        "format": PROJECT_FORMAT,
        "model_name": architecture,
        "model_kwargs": kwargs,
        "state_dict": unwrap_state_dict(state_dict),
        "class_names": list(labels) if labels else None,
        "data_config": data_config_from_pretrained_cfg(pretrained_cfg),
        "origin": HUB_ORIGIN,
        "record": config.get(RECORD_KEY) or {},
    }


def data_config_from_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's preprocessing keys (``input_size``, ``crop_pct``, ``crop_mode``, ...) in the project's data-config
    form (``img_size``, ...), with timm's defaults for missing keys."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "img_size": int((cfg.get("input_size") or (3, 224, 224))[-1]),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": cfg.get("crop_mode") or "center",
        "interpolation": cfg.get("interpolation") or "bicubic",
        "mean": list(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
        "std": list(cfg.get("std") or IMAGENET_DEFAULT_STD),
    }


def pretrained_cfg_from_data_config(data_config: Mapping[str, Any], in_chans: int = 3) -> dict[str, Any]:
    """The inverse of :func:`data_config_from_pretrained_cfg`: the entries timm's ``resolve_data_config`` reads."""
    size = data_config["img_size"]
    return {
        "input_size": [in_chans, size, size],
        "crop_pct": data_config["crop_pct"],
        "crop_mode": data_config.get("crop_mode", "center"),
        "interpolation": data_config["interpolation"],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
    }


def write_hub_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    model_args: Mapping[str, Any],
    data_config: Mapping[str, Any],
    label_names: Sequence[str] | None = None,
    record: Mapping[str, Any] | None = None,
    card: Callable[[Path], str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (built by ``timm.create_model``) as a hub folder with timm's ``save_for_hf``: safetensors
    weights and a ``config.json`` whose ``pretrained_cfg`` carries ``data_config`` and whose ``model_args`` rebuild
    the model; ``label_names`` and ``record`` (under ``"fcaformer"``) are added to it. ``model.pretrained_cfg`` is
    updated with ``data_config``.

    All or nothing: everything is written into a temporary folder beside ``out_dir``, ``card(folder)`` (which may
    load the written folder, e.g. to measure parity, and returns the ``README.md`` text) runs there, and the folder
    is then renamed into place. An error at any point leaves no ``out_dir`` behind (or the old one).

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is false.
    """
    from timm.models import save_for_hf

    out = Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # The preprocessing goes into the model's own pretrained_cfg, which every timm version's writer copies
        # (newer ones merge a model_config["pretrained_cfg"], older ones would replace the whole entry with it).
        model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}),
                                **pretrained_cfg_from_data_config(data_config, getattr(model, "in_chans", 3))}
        model_config: dict[str, Any] = {}
        if label_names:
            model_config["label_names"] = list(label_names)
        if record:
            model_config[RECORD_KEY] = dict(record)
        save_for_hf(model, str(tmp), model_config=model_config, model_args=dict(model_args),
                    safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp))
        _sync_folder(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sync_folder(folder: Path) -> None:
    """fsync every file and the folder itself, so that the rename publishes complete files."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an existing ``out`` (moved aside first)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def create_from_hf_hub(name: str) -> nn.Module:
    """``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``: timm downloads the config and weights (nothing
    in this project downloads by itself).

    Raises:
        CheckpointError: timm could not build or download it (no network, unknown repository, ...), in one line.
    """
    import fcaformer  # noqa: F401  (registers the models with timm)

    try:
        return timm.create_model(name, pretrained=True)
    except Exception as error:  # network, hub and config errors come in many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"timm could not load {name}: {first_line}") from error


# ------------------------------------------------------------------------------------------------ convert
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

    ``source`` is anything :func:`fcaformer.pretrained.read_pretrained` reads: a release classification
    checkpoint, a project checkpoint (``model.pt``, ``.safetensors``), a training state, another hub folder, or a
    bare state dict in this project's layout (then ``model_name``, and ``model_kwargs`` such as ``img_size``, say
    what to build). The folder's preprocessing is the release's (:func:`fcaformer.checkpoint.release_data_config`)
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
    import fcaformer  # noqa: F401  (registers the models with timm)

    from .checkpoint import load_official
    from .io import load_model
    from .models.names import describe_model
    from .pretrained import read_pretrained
    from .profile import count_macs, count_params

    weights = read_pretrained(source, use_ema=use_ema)
    if weights.kind == "release dense backbone":
        raise CheckpointError(f"{weights.label} is a dense-prediction backbone (no classifier): only classification "
                              "checkpoints become timm models")
    name = model_name or weights.model_name
    if name is None:
        raise CheckpointError(f"{weights.label} is a bare state dict that does not say which network it holds; "
                              "pass the model name (fcaformer convert --model NAME)")
    if not timm.is_model(name):
        raise CheckpointError(f"unknown model {name!r} (see timm.list_models())")
    kwargs = {**(weights.model_kwargs if model_name is None and weights.model_kwargs else {}), **(model_kwargs or {})}
    if "num_classes" not in kwargs:  # a bare state dict: its classifier says how many classes
        classifier = get_pretrained_cfg_value(name, "classifier")
        head = weights.state_dict.get(f"{classifier}.weight")
        if head is not None:
            kwargs["num_classes"] = int(head.shape[0])
    model = timm.create_model(name, **kwargs)
    load_state_dict_strict(model, weights.state_dict)
    model.eval()
    data_config = dict(weights.data_config or _model_data_config(model))
    size, in_chans = int(data_config["img_size"]), int(getattr(model, "in_chans", 3))

    # The reference is the source as the project loads it everywhere else (release: load_official's own build).
    if weights.kind == "release checkpoint":
        reference = load_official(weights.raw, use_ema=use_ema)
    elif weights.kind in ("project checkpoint", "timm hub folder"):
        reference = load_model(weights.raw)[0]
    else:  # a training state or a bare state dict: nothing else builds them than this model
        reference = model
    expected = _logits(reference, size, in_chans)
    measured: dict[str, float] = {}

    def card(folder: Path) -> str:
        loaded = timm.create_model(f"{LOCAL_PREFIX}{folder}", pretrained=True)
        got = _logits(loaded, size, in_chans)
        measured["max_abs_diff"] = (got - expected).abs().max().item()
        measured["relative_diff"] = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if measured["relative_diff"] > PARITY_TOLERANCE:
            raise CheckpointError(f"the written folder computes other logits than {weights.label} (relative "
                                  f"difference {measured['relative_diff']:.2e} > {PARITY_TOLERANCE}); nothing written")
        _record_parity(folder, measured)
        return model_card(report())

    architecture = describe_model(name, kwargs)
    params, macs = count_params(model), count_macs(model, (1, in_chans, size, size))

    def report() -> ConvertReport:
        return ConvertReport(
            out_dir=str(out_dir), source=weights.label, source_kind=weights.kind, source_sha256=weights.sha256,
            model=name, architecture=architecture, model_args=dict(kwargs), params=params, macs=macs, img_size=size,
            **measured,
        )

    record = {"source": weights.label, "source_kind": weights.kind, "source_sha256": weights.sha256,
              "architecture": architecture}
    write_hub_folder(model, out_dir, model_args=kwargs, data_config=data_config, label_names=weights.class_names,
                     record=record, card=card, overwrite=overwrite)
    return report()


def _record_parity(folder: Path, measured: Mapping[str, float]) -> None:
    """Add the measured parity to the ``"fcaformer"`` record of the folder's ``config.json``."""
    from .io import atomic_json_dump

    config = json.loads((folder / "config.json").read_text())
    config.setdefault(RECORD_KEY, {})["parity"] = {
        **measured, "tolerance": PARITY_TOLERANCE,
        "measured_on": "2 seeded random images, float32, CPU, faithful path of the source vs timm's local-dir load",
    }
    atomic_json_dump(config, folder / "config.json")


def _model_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing of a timm model's ``pretrained_cfg`` at its native size, in data-config form."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    size = getattr(model, "img_size", None)
    if size is not None:
        side = size if isinstance(size, int) else size[-1]
        cfg["input_size"] = (getattr(model, "in_chans", 3), side, side)
    return data_config_from_pretrained_cfg(cfg)


def model_card(report: ConvertReport) -> str:
    """The ``README.md`` of a converted folder: what it is, its size and cost, where it came from, how it loads."""
    gmacs = report.macs / 1e9
    sha = report.source_sha256 or "n/a (not a single file)"
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
