"""State dicts of FcaFormer models: checkpoint unwrapping, the authors' release key layout, grid-sized parameters
resized to another input size, strict loading, and timm's ``pretrained_filter_fn`` built from them.

Tensors and modules only, like timm's ``_helpers``: nothing here reads a file or knows a file format, so the model
registry can use it and everything that reads weights (:mod:`fcaformer.weights`) builds on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..errors import CheckpointError, name_list
from ..layers import FcaBlock, resize_grid_values

StateDict = dict[str, torch.Tensor]

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


def square_side(num_tokens: int, key: str) -> int:
    """The side of a square grid of ``num_tokens`` tokens (``key`` names the tensor in the error)."""
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
            side = square_side(resized[key].shape[-1], key)
            resized[key] = resize_grid_values(resized[key], (side, side), block.grid_size)
        sources = block.num_sources
        for key, dim in ((f"{prefix}attn.cross_bias", -1), (f"{prefix}cross_scale", 1)):
            if not sources or not mismatched(key) or resized[key].shape[dim] % sources:
                continue
            value = resized[key]
            side = square_side(value.shape[dim] // sources, key)
            per_source = value.reshape(value.shape[1], sources, -1) if dim == -1 else value.reshape(sources, -1)
            grid = resize_grid_values(per_source, (side, side), block.cross_grid)
            resized[key] = grid.reshape(expected[key].shape) if grid.numel() == expected[key].numel() else value
    if mismatched("pos_embed") and hasattr(model, "grid_size"):
        side = square_side(resized["pos_embed"].shape[1] - 1, "pos_embed")
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
