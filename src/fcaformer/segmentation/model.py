"""UperNet on FcaFormer through segmentation_models_pytorch's timm-universal encoder (``tu-fcaformer_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ..detection.backbone import DEFAULT_WINDOW, LoadReport, load_backbone_weights
from ..models import ARCHS

SEGMENTOR_MODES: tuple[str, ...] = ("windowed", "global")
DECODER_NORMS: tuple[str, ...] = ("batchnorm", "identity")
SIZE_DIVISOR = 32
"""smp checks that inputs are multiples of the encoder's output stride; :func:`pad_to_multiple` pads."""


def upernet(
    variant: str = "fcaformer_l2",
    num_classes: int = 150,
    *,
    backbone_mode: str = "windowed",
    window_size: Sequence[int] = DEFAULT_WINDOW,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    decoder_channels: int = 512,
    decoder_norm: str = "batchnorm",
) -> smp.UPerNet:
    """``smp.UPerNet(encoder_name="tu-<variant>")`` with FcaFormer's four stage maps (strides 4-32).

    Args:
        variant: hybrid backbone, ``fcaformer_l1`` ... ``fcaformer_l4``.
        num_classes: output classes (150 for ADE20K).
        backbone_mode: ``"windowed"`` (the release's windowed Fca stages, any input size) or ``"global"``.
        window_size: windows of stages 3 and 4 in windowed mode.
        backbone_weights: release classification / mmseg / mmdet or project checkpoint for the trunk (the
            mmseg checkpoints' 1x1 projections have no counterpart here and are reported as unused).
        backbone_kwargs: architecture overrides (``dims``, ``depths``, ``num_heads``, ``drop_path_rate``, ...).
        decoder_channels: UperNet width (512 as in the release's mmseg config; smp's default is 256).
        decoder_norm: ``"batchnorm"`` (as the release's SyncBN) or ``"identity"`` (no norm, convs get biases).
            With tiny batches BatchNorm's batch statistics (the PSP branch pools to 1x1) differ badly from its
            running statistics, so eval-mode predictions collapse; use ``"identity"`` there.
    """
    if variant not in ARCHS:
        raise ValueError(f"unknown backbone {variant!r}; choose one of {sorted(ARCHS)}")
    if backbone_mode not in SEGMENTOR_MODES:
        raise ValueError(f"unknown backbone mode {backbone_mode!r} for UperNet; choose one of {SEGMENTOR_MODES}")
    if decoder_norm not in DECODER_NORMS:
        raise ValueError(f"unknown decoder_norm {decoder_norm!r}; choose one of {DECODER_NORMS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    windows = tuple(window_size) if backbone_mode == "windowed" else None
    model = smp.UPerNet(encoder_name=f"tu-{variant}", encoder_weights=None, classes=num_classes,
                        decoder_channels=decoder_channels, decoder_use_norm=decoder_norm, window_size=windows,
                        **dict(backbone_kwargs or {}))
    # The classifier's LayerNorm is unused by the encoder; drop it (no gradient-less parameters under DDP).
    segmentor_trunk(model).head = nn.Identity()
    if backbone_weights is not None:
        load_segmentor_backbone(model, backbone_weights)
    return model


def segmentor_trunk(model: nn.Module) -> nn.Module:
    """The :class:`~fcaformer.models.FcaFormer` inside an smp model built by :func:`upernet`."""
    model = getattr(model, "module", model)
    return model.encoder.model.model


def load_segmentor_backbone(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load trunk weights into a :func:`upernet` model (see :func:`~fcaformer.detection.load_backbone_weights`)."""
    return load_backbone_weights(segmentor_trunk(model), source)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_DIVISOR) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad a ``(B, C, H, W)`` batch on the bottom/right to multiples of ``multiple``; returns (H, W) too."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    return (F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x), (height, width)


def segment_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` for a normalised batch of any size (padded for the encoder, cropped back)."""
    padded, (height, width) = pad_to_multiple(x)
    return model(padded)[:, :, :height, :width]
