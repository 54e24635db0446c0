"""Object detection and instance segmentation: torchvision Mask R-CNN / Faster R-CNN + FPN on FcaFormer.

``fcaformer.detection.mask_rcnn("fcaformer_l2", num_classes=81, backbone_weights=...)`` builds a detector;
``fcaformer detect train | eval | predict`` trains and evaluates it on COCO-format data.
"""

from .backbone import BACKBONE_MODES, LoadReport, MultiScaleBackbone, build_backbone, load_backbone_weights
from .data import AnnotationError, CocoDetection
from .inputs import DataCheckError, SampleError
from .model import FcaFormerFPN, build_detector, faster_rcnn, mask_rcnn

__all__ = ["BACKBONE_MODES", "AnnotationError", "CocoDetection", "DataCheckError", "FcaFormerFPN", "LoadReport",
           "MultiScaleBackbone", "SampleError", "build_backbone", "build_detector", "faster_rcnn",
           "load_backbone_weights", "mask_rcnn"]
