"""Semantic segmentation: UperNet (segmentation_models_pytorch, ``tu-fcaformer_*`` encoder) on FcaFormer.

``fcaformer.segmentation.upernet("fcaformer_l2", num_classes=150, backbone_weights=...)`` builds the model;
``fcaformer segment train | eval | predict`` trains and evaluates it on ADE20K-format data.
"""

from .data import IGNORE_INDEX, SegmentationFolder
from .model import load_segmentor_backbone, segment_logits, segmentor_trunk, upernet

__all__ = ["IGNORE_INDEX", "SegmentationFolder", "load_segmentor_backbone", "segment_logits", "segmentor_trunk",
           "upernet"]
