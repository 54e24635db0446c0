"""timm hub folders and hub names: the layout in which timm users share weights.

A hub folder holds ``config.json`` (timm's ``save_for_hf`` form: ``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg`` with the preprocessing), the weights (``model.safetensors``) and a model card (``README.md``).
timm builds it with ``timm.create_model("local-dir:PATH", pretrained=True)`` (``hf-hub:ORG/NAME`` once uploaded to
the Hugging Face Hub), after ``import fcaformer`` has registered the architectures.

This module reads such folders (and ``hf-hub:`` names, through timm) into records, and writes them, all or
nothing, with timm's own writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..errors import CheckpointError
from ..files import file_sha256, path_label, sync_folder_entry, umask
from ..models.state_dicts import unwrap_state_dict
from .reading import read_safetensors, read_torch_file
from .record import WeightsRecord

LOCAL_PREFIX = "local-dir:"
"""timm's model-name prefix for a hub folder on the local file system."""
HF_PREFIX = "hf-hub:"
"""timm's model-name prefix for a model on the Hugging Face Hub (downloaded by timm; nothing here downloads)."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
"""Weight files of a hub folder, in timm's order of preference."""
RECORD_KEY = "fcaformer"
"""Top-level ``config.json`` entry where ``fcaformer convert`` records the source and the measured parity (timm
ignores top-level entries it does not know)."""


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
    """What a hub folder holds, in the project's terms: ``model_name`` from ``architecture``, ``model_kwargs`` from
    ``model_args`` and ``num_classes``, ``state_dict``, ``class_names`` from ``label_names``, ``data_config`` from
    ``pretrained_cfg``, ``record`` (what ``fcaformer convert`` recorded: source, parity) and ``weights`` (the file
    read).

    Raises:
        CheckpointError: an unreadable ``config.json`` or weights file, or a config without ``architecture``.
    """
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
    state_dict = read_safetensors(weights)[0] if weights.suffix == ".safetensors" else read_torch_file(weights)
    kwargs = dict(config.get("model_args") or {})
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    labels = config.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(labels, dict):  # timm allows {index: name} when indices have gaps
        labels = [labels[k] for k in sorted(labels, key=int)]
    return {
        "model_name": architecture,
        "model_kwargs": kwargs,
        "state_dict": unwrap_state_dict(state_dict),
        "class_names": list(labels) if labels else None,
        "data_config": data_config_from_pretrained_cfg(pretrained_cfg),
        "record": config.get(RECORD_KEY) or {},
        "weights": weights,
    }


def hub_folder_record(folder: str | os.PathLike) -> WeightsRecord:
    """A hub folder as a record; release weights converted by ``fcaformer convert`` keep the release's
    preprocessing rule."""
    content = read_hub_folder(folder)
    record = content["record"]
    return WeightsRecord(
        content["state_dict"], "timm hub folder", path_label(folder), model_name=content["model_name"],
        model_kwargs=content["model_kwargs"], class_names=content["class_names"], data_config=content["data_config"],
        release_preprocessing=record.get("source_kind") == "release checkpoint",
        sha256=file_sha256(content["weights"]), path=content["weights"], info={"record": record}, raw=content,
    )


def hf_hub_record(name: str) -> WeightsRecord:
    """``hf-hub:ORG/NAME``: timm builds the model and downloads its weights (nothing in this project downloads by
    itself); its config says what it is.

    Raises:
        CheckpointError: timm could not build or download it (no network, unknown repository, ...), in one line.
    """
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # network, hub and config errors come in many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"timm could not load {name}: {first_line}") from error
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    kwargs = {**(getattr(model, "pretrained_model_args", None) or {}), "num_classes": model.num_classes}
    labels = cfg.get("label_names")
    return WeightsRecord(model.state_dict(), "hf-hub model", name, model_name=cfg.get("architecture"),
                         model_kwargs=kwargs, class_names=list(labels) if labels else None,
                         data_config=data_config_from_pretrained_cfg(cfg))


def data_config_from_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's preprocessing keys (``input_size``, ``crop_pct``, ``crop_mode``, ...) in the project's data-config
    form (``img_size``, ...), with timm's defaults for missing keys."""
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
        tmp.chmod(0o777 & ~umask())  # mkdtemp's folder is private (0o700); a published folder is not
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
    """Give every file the mode of a normal write and fsync it and the folder itself, so that the rename publishes
    complete, readable files."""
    mode = 0o666 & ~umask()  # what a plain write gives: some writers (safetensors) create private files
    for path in folder.iterdir():
        path.chmod(mode)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    sync_folder_entry(folder)


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
