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

from ..checkpoint import CheckpointError, load_official, load_state_dict_strict, release_data_config
from ..fast import fast_attention_modules, fuse_model
from ..hub import HF_PREFIX, HUB_ORIGIN, LOCAL_PREFIX, create_from_hf_hub, data_config_from_pretrained_cfg
from ..io import PROJECT_FORMAT, load_model, read_model_file


@dataclass
class LoadedModel:
    """A classifier in eval mode with what is needed to feed it and name its outputs."""

    model: nn.Module
    source: str
    kind: str  # "project", "official", "timm hub folder" or "timm"
    class_names: list[str]
    class_ids: list[str] | None  # ImageNet synsets (wnids) for 1000-class models, to match ImageFolder wnids
    data_config: dict[str, Any]
    train_config: dict[str, Any] | None = None
    fused: bool = False  # running fcaformer's fast inference path (fcaformer.fast.fuse_model)
    # the weights are the authors' release (directly or converted): evaluate at any size as the release does
    release_preprocessing: bool = False

    def data_config_at(self, img_size: int | None = None) -> dict[str, Any]:
        """The preprocessing at ``img_size`` (default: the recorded size). Release weights follow the release's
        rule (:func:`fcaformer.checkpoint.release_data_config`: resize + centre crop 0.875 below 384 px, a plain
        warp from 384 px on); other models keep their recorded crop and normalisation."""
        if img_size is None:
            return dict(self.data_config)
        if self.release_preprocessing:
            return release_data_config(img_size)
        return {**self.data_config, "img_size": img_size}


def _imagenet_names(num_classes: int) -> tuple[list[str], list[str] | None]:
    if num_classes != 1000:
        return [str(i) for i in range(num_classes)], None
    info = ImageNetInfo()
    ids = list(info.label_names())
    return [info.index_to_description(i).split(",")[0] for i in range(1000)], ids


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    return data_config_from_pretrained_cfg(resolve_data_config({}, model=model))


def load_any_model(source: str | os.PathLike, weights: str | os.PathLike | None = None,
                   use_ema: bool = False, fast: bool = True) -> LoadedModel:
    """Load ``source``: a project checkpoint (:func:`fcaformer.io.save_model`), an official release checkpoint
    (:func:`fcaformer.load_official`), a timm hub folder (a directory with ``config.json``, or ``local-dir:PATH``),
    a timm model name (``weights``: an optional state_dict or safetensors file for it) or ``hf-hub:NAME``
    (downloaded by timm).

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
    text = str(source)
    if text.startswith(HF_PREFIX):  # timm downloads it
        model = create_from_hf_hub(text).eval()
        names, ids = _imagenet_names(model.num_classes)
        return LoadedModel(model, text, "timm", names, ids, _timm_data_config(model))
    local = text.startswith(LOCAL_PREFIX)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or path.exists() or local:
        raw = read_model_file(source)
        if local:
            path = Path(text.removeprefix(LOCAL_PREFIX))
        if isinstance(raw, dict) and raw.get("format") == PROJECT_FORMAT:
            model, ckpt = load_model(raw)
            names, ids = (list(ckpt["class_names"]), None) if ckpt.get("class_names") else \
                _imagenet_names(model.num_classes)
            data = ckpt.get("data_config") or _timm_data_config(model)
            hub = ckpt.get("origin") == HUB_ORIGIN
            release = (ckpt.get("record") or {}).get("source_kind") == "release checkpoint"
            return LoadedModel(model, str(path), "timm hub folder" if hub else "project", names, ids, data,
                               ckpt.get("train_config"), release_preprocessing=release)
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
        # the release's preprocessing at the size it was trained at (read off the checkpoint)
        return LoadedModel(model, str(path), "official", names, ids, release_data_config(model.img_size[0]),
                           release_preprocessing=True)
    if not timm.is_model(str(source)):
        raise FileNotFoundError(f"{source!r} is neither an existing checkpoint file nor a timm model name "
                                "(see timm.list_models())")
    model = timm.create_model(str(source), pretrained=False)
    if weights is not None:
        state = read_model_file(weights)
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
