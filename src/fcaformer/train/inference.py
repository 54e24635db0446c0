"""Loading any classifier for ``eval`` / ``predict`` (through :func:`fcaformer.weights.read_weights`), with the
matching preprocessing and class names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from ..errors import CheckpointError
from ..fast import fast_attention_modules, fuse_model
from ..weights import read_weights
from ..weights.hub import data_config_from_pretrained_cfg
from ..weights.release import release_data_config


@dataclass
class LoadedModel:
    """A classifier in eval mode with what is needed to feed it and name its outputs."""

    model: nn.Module
    source: str
    kind: str  # "project", "official" (release), "timm hub folder" or "timm" (see EVAL_KINDS)
    class_names: list[str]
    class_ids: list[str] | None  # ImageNet synsets (wnids) for 1000-class models, to match ImageFolder wnids
    data_config: dict[str, Any]
    train_config: dict[str, Any] | None = None
    fused: bool = False  # running fcaformer's fast inference path (fcaformer.fast.fuse_model)
    # the weights are the authors' release (directly or converted): evaluate at any size as the release does
    release_preprocessing: bool = False

    def data_config_at(self, img_size: int | None = None) -> dict[str, Any]:
        """The preprocessing at ``img_size`` (default: the recorded size). Release weights follow the release's
        rule (:func:`fcaformer.weights.release.release_data_config`: resize + centre crop 0.875 below 384 px, a
        plain warp from 384 px on); other models keep their recorded crop and normalisation."""
        if img_size is None:
            return dict(self.data_config)
        if self.release_preprocessing:
            return release_data_config(img_size)
        return {**self.data_config, "img_size": img_size}


EVAL_KINDS = {"project checkpoint": "project", "training state": "project", "release checkpoint": "official",
              "timm hub folder": "timm hub folder"}
"""How eval and predict name the kind of weights (:attr:`fcaformer.weights.WeightsRecord.kind`); ``"timm"`` for the
others (hub names, model names, bare state dicts)."""


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
    """Load a classifier from anything :func:`fcaformer.weights.read_weights` reads: a project checkpoint, a
    release checkpoint, a training state, a timm hub folder, ``hf-hub:NAME`` or a registered model name (random
    weights; ``weights``: a state dict or safetensors file for it).

    With ``fast`` (default), FcaFormer models are fused in place (:func:`fcaformer.fast.fuse_model`: same outputs
    within 1e-5, faster); ``fast=False`` keeps the faithful computation that mirrors the release.

    Raises:
        CheckpointError / FileNotFoundError: with a message naming the file and what was expected.
    """
    if weights is not None:
        record = read_weights(weights, model_name=str(source))
    else:
        record = read_weights(source, use_ema=use_ema)
    if record.kind == "release dense backbone":
        raise CheckpointError(f"{record.label} is a dense-prediction backbone (no classifier); eval/predict need a "
                              "classification checkpoint")
    model = record.build()
    if record.class_names:
        names, ids = list(record.class_names), None
    else:
        names, ids = _imagenet_names(model.num_classes)
    data_config = record.data_config or _timm_data_config(model)
    loaded = LoadedModel(model, str(source), EVAL_KINDS.get(record.kind, "timm"), names, ids, data_config,
                         record.info.get("train_config"), release_preprocessing=record.release_preprocessing)
    if fast and fast_attention_modules(loaded.model):
        fuse_model(loaded.model, inplace=True)
        loaded.fused = True
    return loaded


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
