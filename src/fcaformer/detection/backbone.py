"""Multi-scale FcaFormer backbones for dense prediction and loading release / project weights into them.

Three modes, all returning four maps at strides 4, 8, 16, 32:

- ``"windowed"``: timm ``features_only`` model with the release's windowed Fca stages (``window_size=(14, 7)``,
  SPEC section 3), trunk maps without projection. Any input size.
- ``"global"``: the same with global attention (position tables resized to the input's grid).
- ``"dense"``: :class:`~fcaformer.models.FcaFormerDense`, the release's dense backbone including its 1x1
  projections and LayerNorms (what the release's mmdet / mmseg checkpoints hold in full).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
from torch import nn

from ..errors import CheckpointError
from ..models import ARCHS, FcaFormer, create_dense_backbone
from ..weights import read_weights

log = logging.getLogger(__name__)

BackboneMode = Literal["windowed", "global", "dense"]
BACKBONE_MODES: tuple[str, ...] = ("windowed", "global", "dense")
DEFAULT_WINDOW = (14, 7)


class MultiScaleBackbone(nn.Module):
    """An FcaFormer returning ``[C1 @ /4, C2 @ /8, C3 @ /16, C4 @ /32]`` maps.

    Attributes:
        trunk: the underlying :class:`~fcaformer.models.FcaFormer` (or ``FcaFormerDense``): load weights and
            build layer-decay groups on it.
        out_channels: channels of the four maps.
    """

    def __init__(self, trunk: FcaFormer, dense: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self.dense = dense
        if not dense:
            # The classifier's LayerNorm is never used for features; keeping it would leave parameters
            # without gradients (an error under DDP) and in the optimizer.
            trunk.reset_classifier(0)
            trunk.head = nn.Identity()
        self.out_channels: list[int] = [info["num_chs"] for info in trunk.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.dense:
            return self.trunk(x)
        return self.trunk.forward_intermediates(x, intermediates_only=True)


def build_backbone(
    variant: str = "fcaformer_l2",
    mode: BackboneMode = "windowed",
    window_size: Sequence[int] = DEFAULT_WINDOW,
    **kwargs: Any,
) -> MultiScaleBackbone:
    """Build a multi-scale backbone of a hybrid variant (``fcaformer_l1`` ... ``fcaformer_l4``).

    Args:
        variant: hybrid model name.
        mode: ``"windowed"``, ``"global"`` or ``"dense"`` (see the module docstring).
        window_size: windows of stages 3 and 4 for the windowed and dense modes.
        kwargs: architecture overrides (``dims``, ``depths``, ``num_heads``, ``drop_path_rate``, ``out_dims``
            for dense, ...).
    """
    if variant not in ARCHS:
        raise ValueError(f"unknown backbone {variant!r}; choose one of {sorted(ARCHS)} (L0 has no feature pyramid)")
    if mode not in BACKBONE_MODES:
        raise ValueError(f"unknown backbone mode {mode!r}; choose one of {BACKBONE_MODES}")
    if mode == "dense":
        return MultiScaleBackbone(create_dense_backbone(variant, window_size=tuple(window_size), **kwargs), True)
    windows = tuple(window_size) if mode == "windowed" else None
    trunk = timm.create_model(variant, num_classes=0, window_size=windows, **kwargs)
    return MultiScaleBackbone(trunk, False)


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did: counts of loaded tensors and the keys left out on each side."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            return f"{keys[:4]}{' ...' if len(keys) > 4 else ''}"

        return (f"loaded {self.loaded} tensors; {len(self.missing)} model keys not in the checkpoint "
                f"{short(self.missing)}; {len(self.unused)} checkpoint keys unused {short(self.unused)}")


def backbone_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Trunk weights in this project's key layout from anything :func:`fcaformer.weights.read_weights` reads: a
    release classification, mmdet or mmseg checkpoint (``backbone.`` prefix), a project checkpoint or training
    state, a bare state_dict or safetensors file, a timm hub folder, or a whole detector / segmentor checkpoint of
    this project (its trunk's keys)."""
    state_dict = read_weights(source).state_dict
    if state_dict is None:
        raise CheckpointError(f"{source} is a model name, not weights: pass a checkpoint for the backbone")
    # Project-layout checkpoints of a whole detector / segmentor: keep what sits under the trunk.
    for prefix in ("backbone.body.trunk.", "backbone.trunk.", "body.trunk.", "trunk.",
                   "encoder.model.model.", "encoder.model."):
        if any(k.startswith(prefix) for k in state_dict):
            return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def load_backbone_weights(
    backbone: MultiScaleBackbone | nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    min_fraction: float = 0.5,
) -> LoadReport:
    """Load trunk weights, non-strictly by name, but all-or-nothing on shapes.

    Keys the model lacks (a classifier, or the dense projections for a windowed trunk) are reported as unused;
    model keys the checkpoint lacks (e.g. the projections when loading a classification checkpoint into the
    dense backbone) keep their initialisation and are reported as missing.

    Raises:
        CheckpointError: a shared key has another shape (another variant / window size), or fewer than
            ``min_fraction`` of the model's tensors would be loaded (almost surely the wrong checkpoint).
    """
    trunk = backbone.trunk if isinstance(backbone, MultiScaleBackbone) else backbone
    state_dict = backbone_state_dict(source)
    expected = trunk.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} backbone tensors have another shape than the model (another variant or window "
            f"size?): {mismatched[:4]}; build the backbone the checkpoint was trained as"
        )
    usable = {k: v for k, v in state_dict.items() if k in expected}
    if len(usable) < min_fraction * len(expected):
        raise CheckpointError(
            f"only {len(usable)} of the backbone's {len(expected)} tensors are in the checkpoint; is it an "
            f"FcaFormer checkpoint? (first keys: {list(state_dict)[:5]})"
        )
    trunk.load_state_dict(usable, strict=False)
    report = LoadReport(
        loaded=len(usable),
        missing=[k for k in expected if k not in usable],
        unused=[k for k in state_dict if k not in expected],
    )
    log.info("backbone weights: %s", report.summary())
    return report
