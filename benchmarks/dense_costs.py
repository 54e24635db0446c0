"""Params and MACs of Mask R-CNN + FcaFormer and UperNet + FcaFormer next to the paper's numbers.

MACs come from ``torch.utils.flop_counter`` (MACs = FLOPs / 2, batch 1, eval mode). Detection follows mmdet's
``get_flops`` convention (``forward_dummy``): backbone + FPN + RPN head on the image, the box head on 1000
RoIs and the mask head on 100 RoIs, so the count does not depend on what an untrained model detects.

Usage: ``python benchmarks/dense_costs.py [--variant fcaformer_l2] [--out benchmarks/results/dense_costs.json]``
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcaformer.detection import build_backbone, mask_rcnn
from fcaformer.files import atomic_json_dump
from fcaformer.profile import count_params
from fcaformer.segmentation import upernet

PAPER = {"mask_rcnn": (37.0, 249.0), "upernet": (46.0, 730.0)}
"""Paper (arXiv 2211.07198): params (M) and GFLOPs of Mask R-CNN + L2 (1280x800) and UperNet + L2."""


def macs(fn, *args: Any) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() // 2


def mask_rcnn_costs(variant: str, mode: str, height: int, width: int) -> dict[str, Any]:
    model = mask_rcnn(variant, 81, backbone_mode=mode).eval()
    image = torch.zeros(1, 3, height, width)
    parts: dict[str, int] = {}
    with torch.no_grad():
        features = model.backbone(image)
    parts["backbone"] = macs(model.backbone.body, image)
    parts["fpn"] = macs(lambda: model.backbone.fpn(OrderedDict(
        (str(i), f) for i, f in enumerate(model.backbone.body(image)))))  # includes backbone; subtract below
    parts["fpn"] -= parts["backbone"]
    levels = list(features.values())
    parts["rpn_head"] = macs(model.rpn.head, levels)
    generator = torch.Generator().manual_seed(0)

    def rois(count: int) -> torch.Tensor:  # random valid boxes, as mmdet's forward_dummy uses random proposals
        xy = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        wh = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.2, height * 0.2]) + 8
        return torch.cat([xy, xy + wh], 1)

    sizes = [(height, width)]
    heads = model.roi_heads
    parts["box_head_1000_rois"] = macs(lambda: heads.box_predictor(heads.box_head(
        heads.box_roi_pool(features, [rois(1000)], sizes))))
    parts["mask_head_100_rois"] = macs(lambda: heads.mask_predictor(heads.mask_head(
        heads.mask_roi_pool(features, [rois(100)], sizes))))
    return {"model": f"Mask R-CNN + {variant} ({mode})", "input": f"{width}x{height}",
            "params_m": count_params(model) / 1e6, "backbone_params_m": count_params(model.backbone.body) / 1e6,
            "gmacs": sum(parts.values()) / 1e9, "parts_gmacs": {k: v / 1e9 for k, v in parts.items()},
            "paper": PAPER["mask_rcnn"]}


class DenseUperNet(nn.Module):
    """The release's arrangement: dense backbone (projections to 96-768) + UperNet (512) + classifier."""

    def __init__(self, variant: str, num_classes: int = 150) -> None:
        super().__init__()
        self.backbone = build_backbone(variant, "dense")
        self.decoder = UPerNetDecoder([3, 0, *self.backbone.out_channels], 5, 512, "batchnorm")
        self.classifier = nn.Conv2d(512, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder([x, x[:, :0], *self.backbone(x)]))


def auxiliary_fcn_head(in_channels: int = 384, num_classes: int = 150) -> nn.Module:
    """mmseg's auxiliary FCNHead (one 3x3 conv to 256 + BN + classifier) on stage 3, counted in mmseg params."""
    return nn.Sequential(nn.Conv2d(in_channels, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                         nn.Conv2d(256, num_classes, 1))


def upernet_costs(variant: str, height: int, width: int, release_layout: bool) -> dict[str, Any]:
    image = torch.zeros(1, 3, height, width)
    if release_layout:
        model = DenseUperNet(variant).eval()
        backbone = model.backbone
        name = f"UperNet + {variant} (dense, release layout, + aux FCN head params)"
        aux = auxiliary_fcn_head(model.backbone.out_channels[2])
        extra_params = count_params(aux)
    else:
        model = upernet(variant, 150).eval()
        backbone = model.encoder
        name = f"UperNet (smp) + {variant} (windowed)"
        extra_params = 0
    return {"model": name, "input": f"{width}x{height}", "params_m": (count_params(model) + extra_params) / 1e6,
            "backbone_params_m": count_params(backbone) / 1e6, "gmacs": macs(model, image) / 1e9,
            "backbone_gmacs": macs(backbone, image) / 1e9, "paper": PAPER["upernet"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="fcaformer_l2")
    parser.add_argument("--out", default="benchmarks/results/dense_costs.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [
        mask_rcnn_costs(args.variant, "windowed", 800, 1280),
        mask_rcnn_costs(args.variant, "dense", 800, 1280),
        upernet_costs(args.variant, 512, 512, release_layout=False),
        upernet_costs(args.variant, 512, 512, release_layout=True),
        upernet_costs(args.variant, 512, 2048, release_layout=True),
    ]
    table = Table(title="Dense-prediction costs (batch 1, MACs = FLOPs / 2, torch.utils.flop_counter)")
    for column in ("model", "input", "params (M)", "backbone (M)", "GMACs", "paper M / G"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row["model"], row["input"], f"{row['params_m']:.2f}", f"{row['backbone_params_m']:.2f}",
                      f"{row['gmacs']:.1f}", f"{row['paper'][0]:.0f} / {row['paper'][1]:.0f}")
    Console().print(table)
    atomic_json_dump(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
