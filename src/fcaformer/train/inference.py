"""Loading any classifier for ``eval`` / ``predict``: a project checkpoint, an official release checkpoint, or a
timm model name; with the matching preprocessing and class names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from ..checkpoint import CheckpointError, load_official, load_state_dict_strict, read_checkpoint
from ..fast import fast_attention_modules, fuse_model
from ..io import PROJECT_FORMAT, load_model, read_model_file


@dataclass
class LoadedModel:
    """A classifier in eval mode with what is needed to feed it and name its outputs."""

    model: nn.Module
    source: str
    kind: str  # "project", "official" or "timm"
    class_names: list[str]
    class_ids: list[str] | None  # ImageNet synsets (wnids) for 1000-class models, to match ImageFolder wnids
    data_config: dict[str, Any]
    train_config: dict[str, Any] | None = None
    fused: bool = False  # running fcaformer's fast inference path (fcaformer.fast.fuse_model)


def _imagenet_names(num_classes: int) -> tuple[list[str], list[str] | None]:
    if num_classes != 1000:
        return [str(i) for i in range(num_classes)], None
    info = ImageNetInfo()
    ids = list(info.label_names())
    return [info.index_to_description(i).split(",")[0] for i in range(1000)], ids


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    cfg = resolve_data_config({}, model=model)
    return {"img_size": int(cfg["input_size"][-1]), "crop_pct": float(cfg["crop_pct"]),
            "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def load_any_model(source: str | os.PathLike, weights: str | os.PathLike | None = None,
                   use_ema: bool = False, fast: bool = True) -> LoadedModel:
    """Load ``source``: a project checkpoint (:func:`fcaformer.io.save_model`), an official release checkpoint
    (:func:`fcaformer.load_official`), or a timm model name (``weights``: an optional state_dict file for it).

    With ``fast`` (default), FcaFormer models are fused in place (:func:`fcaformer.fast.fuse_model`: same outputs
    within 1e-5, faster); ``fast=False`` keeps the faithful computation that mirrors the release.

    Raises:
        CheckpointError / FileNotFoundError: with a message naming the file and what was expected.
    """
    loaded = _load_any_model(source, weights, use_ema)
    if fast and fast_attention_modules(loaded.model):
        fuse_model(loaded.model, inplace=True)
        loaded.fused = True
    return loaded


def _load_any_model(source: str | os.PathLike, weights: str | os.PathLike | None, use_ema: bool) -> LoadedModel:
    import fcaformer  # noqa: F401  (registers the models)

    path = Path(source)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or path.exists():
        raw = read_model_file(path)
        if isinstance(raw, dict) and raw.get("format") == PROJECT_FORMAT:
            model, ckpt = load_model(raw)
            names = list(ckpt.get("class_names") or _imagenet_names(model.num_classes)[0])
            data = ckpt.get("data_config") or _timm_data_config(model)
            return LoadedModel(model, str(path), "project", names, None, data, ckpt.get("train_config"))
        try:
            model = load_official(raw, use_ema=use_ema)
        except CheckpointError as error:
            raise CheckpointError(
                f"{path} is neither an fcaformer project checkpoint nor an official FcaFormer release "
                f"checkpoint: {error}"
            ) from error
        if not hasattr(model, "num_classes") or not model.num_classes:
            raise CheckpointError(f"{path} is a dense-prediction backbone (no classifier); eval/predict need a "
                                  "classification checkpoint")
        names, ids = _imagenet_names(model.num_classes)
        return LoadedModel(model, str(path), "official", names, ids, _timm_data_config(model))
    if not timm.is_model(str(source)):
        raise FileNotFoundError(f"{source!r} is neither an existing checkpoint file nor a timm model name "
                                "(see timm.list_models())")
    model = timm.create_model(str(source), pretrained=False)
    if weights is not None:
        state = read_checkpoint(weights)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        load_state_dict_strict(model, state)
    model.eval()
    names, ids = _imagenet_names(model.num_classes)
    return LoadedModel(model, str(source), "timm", names, ids, _timm_data_config(model))


def class_index_map(loaded: LoadedModel, folder_classes: list[str]) -> list[int] | None:
    """For a 1000-class ImageNet model evaluated on an ImageFolder of ImageNet synsets (e.g. Imagenette), the
    model output index of each folder class; ``None`` when the outputs already are the dataset's classes."""
    if loaded.class_ids is None or len(folder_classes) == len(loaded.class_names):
        return None
    missing = [c for c in folder_classes if c not in loaded.class_ids]
    if missing:
        raise ValueError(f"the model has {len(loaded.class_names)} ImageNet classes but the dataset folders "
                         f"{missing[:5]} are not ImageNet synsets; evaluate a model trained on this dataset")
    return [loaded.class_ids.index(c) for c in folder_classes]


class SelectOutputs(nn.Module):
    """Keep only some logits (the dataset's classes out of a larger label space)."""

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)
