"""torchvision Mask R-CNN / Faster R-CNN with an FPN on a multi-scale FcaFormer backbone."""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..models.hybrid import FcaFormer
from ..train.config import check_known_keys
from .backbone import DEFAULT_WINDOW, BackboneMode, MultiScaleBackbone, build_backbone, load_backbone_weights


class FcaFormerFPN(nn.Module):
    """Backbone + FPN in torchvision's detector contract: ``forward`` returns an ``OrderedDict`` of 256-channel
    maps ``"0"``-``"3"`` (strides 4-32) and ``"pool"`` (stride 64), and ``out_channels`` is set."""

    def __init__(self, body: MultiScaleBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(self.body(x))))


def _build(
    detector: type[FasterRCNN],
    variant: str,
    num_classes: int,
    backbone_mode: BackboneMode,
    window_size: Sequence[int],
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None,
    backbone_kwargs: Mapping[str, Any] | None,
    fpn_channels: int,
    min_size: int | Sequence[int],
    max_size: int,
    box_head_dim: int,
    mask_head_channels: int,
    **detector_kwargs: Any,
) -> FasterRCNN:
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    body = build_backbone(variant, backbone_mode, window_size, **dict(backbone_kwargs or {}))
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights)
    min_size = tuple(min_size) if isinstance(min_size, Sequence) else (min_size,)
    # torchvision's default heads (1024-d box MLP, four 256-channel mask convs), with the widths exposed so
    # that small test / CPU models are possible.
    resolution = 7  # RoIAlign output side of the default box pooler
    detector_kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * resolution**2, box_head_dim))
    detector_kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_dim, num_classes))
    if detector is MaskRCNN:
        detector_kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1))
        detector_kwargs.setdefault("mask_predictor",
                                   MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes))
    model = detector(
        FcaFormerFPN(body, fpn_channels),
        num_classes=None,  # the heads above carry the classes
        min_size=min_size,  # several sizes: torchvision picks one at random per training batch (multi-scale)
        max_size=max_size,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        **detector_kwargs,
    )
    return model


def mask_rcnn(
    variant: str = "fcaformer_l2",
    num_classes: int = 81,
    *,
    backbone_mode: BackboneMode = "windowed",
    window_size: Sequence[int] = DEFAULT_WINDOW,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    **detector_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN (torchvision) with an FPN on FcaFormer.

    Args:
        variant: hybrid backbone, ``fcaformer_l1`` ... ``fcaformer_l4``.
        num_classes: object classes + 1 (background is label 0), e.g. 81 for COCO.
        backbone_mode: ``"windowed"`` (release's Fca windows), ``"global"`` or ``"dense"`` (with projections).
        window_size: windows of stages 3 and 4.
        backbone_weights: release classification / mmdet / mmseg checkpoint or project checkpoint for the trunk.
        backbone_kwargs: architecture overrides (``dims``, ``depths``, ``num_heads``, ``drop_path_rate``, ...).
        fpn_channels: FPN width.
        min_size: shorter side after resizing; a sequence enables multi-scale training.
        max_size: longer-side cap.
        box_head_dim: width of the two-layer box MLP (torchvision default 1024).
        mask_head_channels: width of the four mask convs (torchvision default 256).
        detector_kwargs: passed to :class:`torchvision.models.detection.MaskRCNN`.
    """
    return _build(MaskRCNN, variant, num_classes, backbone_mode, window_size, backbone_weights, backbone_kwargs,
                  fpn_channels, min_size, max_size, box_head_dim, mask_head_channels, **detector_kwargs)


def faster_rcnn(
    variant: str = "fcaformer_l2",
    num_classes: int = 81,
    *,
    backbone_mode: BackboneMode = "windowed",
    window_size: Sequence[int] = DEFAULT_WINDOW,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    **detector_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN (torchvision) with an FPN on FcaFormer; arguments as :func:`mask_rcnn`."""
    return _build(FasterRCNN, variant, num_classes, backbone_mode, window_size, backbone_weights,
                  backbone_kwargs, fpn_channels, min_size, max_size, box_head_dim, mask_head_channels,
                  **detector_kwargs)


DETECTORS = {"mask_rcnn": mask_rcnn, "faster_rcnn": faster_rcnn}
"""Builders by architecture name (used by the CLI and by checkpoints)."""


def build_detector(arch: str, **kwargs: Any) -> FasterRCNN:
    """Build ``"mask_rcnn"`` or ``"faster_rcnn"`` with :func:`mask_rcnn`'s keyword arguments."""
    if arch not in DETECTORS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[arch](**kwargs)


def _parameters(function: Any, exclude: Sequence[str]) -> list[str]:
    """Named parameters of ``function`` (no ``self``, ``*args``, ``**kwargs``) not in ``exclude``."""
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.name not in ("self", *exclude) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# set by ``detect train`` itself (its own options, the data), or by the builder
_SET_BY_TRAIN = ("variant", "num_classes", "backbone_mode", "backbone_weights", "backbone_kwargs", "min_size",
                 "max_size", "backbone", "image_mean", "image_std")


def detector_options(arch: str) -> list[str]:
    """The keys ``--detector-kwargs`` may set for ``arch``: the builder's (head widths, windows) and torchvision's
    detector and input-transform options."""
    detector = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    return sorted({*_parameters(DETECTORS[arch], _SET_BY_TRAIN), *_parameters(detector.__init__, _SET_BY_TRAIN),
                   "size_divisible", "fixed_size"})  # torchvision passes these on to GeneralizedRCNNTransform


def backbone_options(mode: str) -> list[str]:
    """The keys ``--backbone-kwargs`` may set: the trunk's architecture options (``out_dims`` too in dense mode),
    except what the mode and the task set."""
    options = _parameters(FcaFormer.__init__, ("num_classes", "window_size", "in_chans"))
    return sorted([*options, "out_dims"] if mode == "dense" else options)


def check_builder_kwargs(backbone_mode: str, backbone_kwargs: Mapping[str, Any], arch: str | None = None,
                         detector_kwargs: Mapping[str, Any] | None = None) -> None:
    """A ``ValueError`` naming an unknown key of ``--backbone-kwargs`` (and, with ``arch``, of
    ``--detector-kwargs``) and the valid ones, before any data is read: torchvision passes keys it does not know
    to its input transform, which ignores them, so a typo would silently train the default."""
    check_known_keys(backbone_kwargs, backbone_options(backbone_mode), "--backbone-kwargs")
    if arch is not None:
        check_known_keys(detector_kwargs or {}, detector_options(arch), "--detector-kwargs")
