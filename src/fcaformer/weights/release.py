"""The authors' release checkpoints (``.pth`` of the classification models, and the windowed dense backbones of
their mmdet / mmseg checkpoints): the architecture read off the tensors, and the release's evaluation
preprocessing."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import CheckpointError
from ..models.hybrid import ARCHS, SMALL_ARCHS, FcaFormer, FcaFormerDense
from ..models.names import registered_architecture
from ..models.state_dicts import convert_release_state_dict, is_release_layout
from .record import WeightsRecord

RELEASE_WARP_SIZE = 384
"""From this size on the release evaluates with a plain bicubic warp to size x size instead of resize + crop."""


def release_data_config(img_size: int) -> dict[str, Any]:
    """The release's evaluation preprocessing at ``img_size`` (its ``build_transform``, from ConvNeXt's code).

    Below 384 px: ``Resize(int(img_size / 0.875), bicubic)`` (shorter side) + ``CenterCrop(img_size)``; from 384
    px on: ``Resize((img_size, img_size), bicubic)``, a warp without crop. Then ImageNet mean/std. In the
    project's data-config form (timm's ``crop_mode="squash"`` with ``crop_pct=1.0`` is exactly the warp).
    """
    warp = img_size >= RELEASE_WARP_SIZE
    return {"img_size": img_size, "crop_pct": 1.0 if warp else 0.875, "crop_mode": "squash" if warp else "center",
            "interpolation": "bicubic", "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}


def infer_release_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture off a release state_dict's tensor shapes.

    Returns constructor arguments for :class:`~fcaformer.models.FcaFormer` (or, when ``windowed``,
    :class:`~fcaformer.models.FcaFormerDense`) plus ``"windowed": bool``.
    """
    if not is_release_layout(state_dict):
        keys = list(state_dict)[:5]
        raise CheckpointError(
            "not an FcaFormer release checkpoint: key 'patch_embed.seq.0.c.weight' is missing "
            f"(first keys: {keys})"
        )

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"incomplete FcaFormer checkpoint: missing {key!r}")
        return tuple(state_dict[key].shape)

    dims = [shape("patch_embed.seq.2.c.weight")[0]]
    dims += [shape(f"layer_{i}.downsample.conv1.c.weight")[0] for i in range(3)]
    depths = []
    for i in range(4):
        indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer_{i}\.blocks\.(\d+)\.", k))}
        if not indices:
            raise CheckpointError(f"incomplete FcaFormer checkpoint: stage {i} (layer_{i}.blocks.*) has no blocks")
        depths.append(max(indices) + 1)
    num_heads = [shape(f"layer_{i}.blocks.0.attention_biases")[0] for i in (2, 3)]
    grid_tokens = [shape(f"layer_{i}.blocks.0.attention_biases")[1] for i in (2, 3)]
    grid_sides = [math.isqrt(n) for n in grid_tokens]
    if any(side * side != n for side, n in zip(grid_sides, grid_tokens)):
        raise CheckpointError(f"cannot infer a square training grid from attention tables of {grid_tokens} tokens")

    windowed = "head0.weight" in state_dict and "head.weight" not in state_dict
    config: dict[str, Any] = dict(dims=tuple(dims), depths=tuple(depths), num_heads=tuple(num_heads),
                                  windowed=windowed)
    if windowed:
        config["window_size"] = tuple(grid_sides)
        config["out_dims"] = tuple(shape(f"head{i}.weight")[0] for i in range(4))
        return config

    config["img_size"] = grid_sides[0] * 16
    config["num_classes"] = shape("head.weight")[0]
    # cab_max_d: block i sees min(i, cab_max_d) earlier blocks' cross tokens; a cap shows where that is < i.
    caps = []
    for stage, side in zip((2, 3), grid_sides):
        tokens_per_block = math.ceil(side / 4) ** 2
        for block in range(1, depths[stage]):
            sources = shape(f"layer_{stage}.blocks.{block}.s_token_bias")[-1] // tokens_per_block
            if sources < block:
                caps.append(sources)
    config["cab_max_d"] = min(caps) if caps else max(12, max(depths[2:]))
    return config


def release_architecture(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered model name and ``timm.create_model`` arguments that build the network of a release
    classification checkpoint, from its :func:`infer_release_config`: the variant with its dims, depths and heads
    (``fcaformer_l1`` when none has them) and every inferred argument that differs from that variant's (always
    ``num_classes`` and ``img_size``)."""
    config = {k: v for k, v in config.items() if k != "windowed"}
    sizes = {k: config[k] for k in ("dims", "depths", "num_heads")}
    name = next((n for n in (*ARCHS, *SMALL_ARCHS)
                 if all(registered_architecture(n)[k] == v for k, v in sizes.items())), "fcaformer_l1")
    reference = registered_architecture(name)
    return name, {k: v for k, v in config.items() if k not in reference or reference[k] != v}


def _build(network: type, config: Mapping[str, Any], **overrides: Any) -> FcaFormer | FcaFormerDense:
    return network(**{**config, **overrides})


def release_record(state_dict: Mapping[str, torch.Tensor], **provenance: Any) -> WeightsRecord:
    """A release state dict (release key layout) as a record: a classification checkpoint (named by
    :func:`release_architecture`, with the release's preprocessing at its training size) or a windowed dense
    backbone (``kind="release dense backbone"``, no registered name). Built the release's way: the network of the
    inferred configuration (``FcaFormer`` / ``FcaFormerDense``), weights converted to this project's keys.

    Raises:
        CheckpointError: an incomplete release checkpoint (naming the missing key).
    """
    config = infer_release_config(state_dict)
    converted = convert_release_state_dict(state_dict)
    if config.pop("windowed"):
        return WeightsRecord(converted, "release dense backbone", builder=partial(_build, FcaFormerDense, config),
                             release_preprocessing=True, **provenance)
    name, kwargs = release_architecture(config)
    return WeightsRecord(converted, "release checkpoint", model_name=name, model_kwargs=kwargs,
                         data_config=release_data_config(config["img_size"]), release_preprocessing=True,
                         builder=partial(_build, FcaFormer, config), **provenance)
