"""Reading the authors' checkpoints: key conversion, architecture inference and all-or-nothing loading."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .layers import FcaBlock, resize_grid_values
from .models.hybrid import ARCHS, SMALL_ARCHS, FcaFormer, FcaFormerDense
from .models.names import registered_architecture

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


# Release key -> project key. Applied in order, each at most once per key. The release downsamples at the end
# of a stage, this project at the start of the next one.
_RENAMES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^patch_embed\.seq\.0\.", "stem.conv1."),
    (r"^patch_embed\.seq\.2\.", "stem.conv2."),
    (r"^layer_(\d)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (r"^layer_(\d)\.blocks\.", "stages.\\1.blocks."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv1\.", ".mlp.fc1."),
    (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.gamma_1$", ".ls1.gamma"),
    (r"\.gamma_2$", ".ls2.gamma"),
    (r"\.attention_biases$", ".attn.rel_pos_table"),
    (r"\.s_token_bias$", ".attn.cross_bias"),
    (r"\.s_scale_factors$", ".cross_scale"),
    (r"\.s_norm\.", ".norm_cross."),
    (r"\.qkv\.", ".attn.qkv."),
    (r"\.proj\.", ".attn.proj."),
    (r"\.dw_conv\.", ".merge."),
    (r"\.local_conv\.", ".enhance."),
    (r"\.c\.weight$", ".conv.weight"),
    (r"^norm_head\.", "head.norm."),
    (r"^head\.(weight|bias)$", "head.fc.\\1"),
    (r"^head(\d)\.weight$", "out_proj.\\1.0.weight"),
    (r"^norm(\d)\.", "out_proj.\\1.1."),
]

_WRAPPER_KEYS = ("model", "model_ema", "state_dict", "module")

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


def name_list(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names of ``items`` and how many more there are, for messages."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{list(items[:limit])}{more}"


def is_release_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys follow the authors' release (``patch_embed.seq.*``, ``layer_*``)."""
    return "patch_embed.seq.0.c.weight" in state_dict


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> StateDict:
    """Find the state_dict in a checkpoint (bare, or under ``model``/``model_ema``/``state_dict``) and strip
    ``module.`` and mmdet/mmseg ``backbone.`` prefixes (keeping only backbone keys when there are any)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    if use_ema and isinstance(checkpoint.get("model_ema"), Mapping):
        checkpoint = checkpoint["model_ema"]
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f"no tensors found in the checkpoint; top-level keys: {list(checkpoint)[:10]}")
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    return state_dict


def convert_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename the release's keys to this project's (values unchanged); non-persistent index buffers dropped."""
    return {_rename(k): v for k, v in state_dict.items() if not k.endswith("attention_bias_idxs")}


def _square_side(num_tokens: int, key: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"{key}: cannot resize a grid of {num_tokens} tokens (not square) to the model's grid")
    return side


def resize_grid_parameters(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Resize grid-sized parameters stored for another (square) grid to the model's native grids.

    Weights trained at one resolution (or in global mode) then load into a model built for another
    ``img_size`` or ``window_size``: relative-position tables, cross-token biases and LSFs are resized exactly as
    the forward pass resizes them at run time (:func:`~fcaformer.layers.resize_grid_values`), and L0's position
    embedding with timm's ``resample_abs_pos_embed``. Keys that already fit, or that differ in something other
    than the grid (heads, number of source blocks), are left as they are for the strict loader to report.
    """
    expected = model.state_dict()
    resized = dict(state_dict)

    def mismatched(key: str) -> bool:
        return key in resized and key in expected and resized[key].shape != expected[key].shape

    for name, block in model.named_modules():
        if not isinstance(block, FcaBlock):
            continue
        prefix = f"{name}." if name else ""
        key = f"{prefix}attn.rel_pos_table"
        if mismatched(key) and resized[key].shape[0] == expected[key].shape[0]:
            side = _square_side(resized[key].shape[-1], key)
            resized[key] = resize_grid_values(resized[key], (side, side), block.grid_size)
        sources = block.num_sources
        for key, dim in ((f"{prefix}attn.cross_bias", -1), (f"{prefix}cross_scale", 1)):
            if not sources or not mismatched(key) or resized[key].shape[dim] % sources:
                continue
            value = resized[key]
            side = _square_side(value.shape[dim] // sources, key)
            per_source = value.reshape(value.shape[1], sources, -1) if dim == -1 else value.reshape(sources, -1)
            grid = resize_grid_values(per_source, (side, side), block.cross_grid)
            resized[key] = grid.reshape(expected[key].shape) if grid.numel() == expected[key].numel() else value
    if mismatched("pos_embed") and hasattr(model, "grid_size"):
        from timm.layers import resample_abs_pos_embed

        side = _square_side(resized["pos_embed"].shape[1] - 1, "pos_embed")
        resized["pos_embed"] = resample_abs_pos_embed(
            resized["pos_embed"], tuple(model.grid_size), (side, side), num_prefix_tokens=1
        )
    return resized


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> StateDict:
    """timm ``pretrained_filter_fn``: accepts release or project checkpoints, wrapped or bare, and resizes
    grid-sized parameters to the model's ``img_size`` / ``window_size``."""
    state_dict = unwrap_state_dict(state_dict)
    if is_release_layout(state_dict):
        state_dict = convert_release_state_dict(state_dict)
    return resize_grid_parameters(state_dict, model)


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


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` a file (weights only) with errors that name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint (truncated, corrupt, or not a torch file): {error}"
        ) from error
    except Exception as error:  # weights_only unpickler rejects arbitrary objects with various types
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {error}") from error


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load only if every key matches in name and shape; otherwise raise before touching the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{len(items)} {label}: {name_list(items)}")
        raise CheckpointError(
            "checkpoint does not fit the model (is it another architecture or variant?); " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


def load_official(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    use_ema: bool = False,
    **overrides: Any,
) -> FcaFormer:
    """Build the model a release checkpoint describes and load it, in eval mode.

    Args:
        checkpoint: a path (``.pth``, a ``.safetensors`` file, or a timm hub folder / ``local-dir:PATH`` as
            ``fcaformer convert`` writes), or an already loaded checkpoint (bare state_dict or wrapped in ``model``,
            ``model_ema`` or ``state_dict``; mmdet/mmseg ``backbone.`` prefixes are stripped). Self-describing
            files (hub folders, project checkpoints) are rebuilt from what they record
            (:func:`fcaformer.io.load_model`).
        use_ema: take ``model_ema`` when the checkpoint has it.
        overrides: constructor arguments to change (e.g. ``drop_path_rate`` for fine-tuning, or ``img_size`` /
            ``window_size``: grid-sized parameters are then resized); the architecture is inferred from the
            tensors.

    Returns:
        an :class:`~fcaformer.models.FcaFormer` computing the release's logits, or, for a windowed dense
        backbone checkpoint, an :class:`~fcaformer.models.FcaFormerDense` returning its four feature maps.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: unreadable file, not an FcaFormer checkpoint, or tensors that do not fit.
    """
    from .io import PROJECT_FORMAT, load_model, read_model_file  # io builds on this module

    raw = read_model_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if isinstance(raw, Mapping) and raw.get("format") == PROJECT_FORMAT:
        return load_model(raw, **overrides)[0]
    state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    config = infer_release_config(state_dict)
    windowed = config.pop("windowed")
    config.update(overrides)
    model = FcaFormerDense(**config) if windowed else FcaFormer(**config)
    load_state_dict_strict(model, resize_grid_parameters(convert_release_state_dict(state_dict), model))
    return model.eval()
