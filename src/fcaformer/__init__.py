"""FcaFormer: forward cross attention in a hybrid vision transformer (arXiv 2211.07198).

Importing the package registers the paper's ``fcaformer_l0`` ... ``fcaformer_l4`` and the small non-paper
``fcaformer_atto`` and ``fcaformer_femto`` with timm (module name ``fcaformer``), and ``fca_any``: any timm ViT or
Swin with forward cross attention (:func:`add_forward_cross_attention`).
"""

from .checkpoint import CheckpointError, checkpoint_filter_fn, load_official
from .layers import FcaBlock, FcaStage
from .models import (
    MODEL_NAMES,
    FcaFormer,
    FcaFormerDense,
    FcaFormerPlain,
    add_forward_cross_attention,
    create_dense_backbone,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "CheckpointError",
    "FcaBlock",
    "FcaFormer",
    "FcaFormerDense",
    "FcaFormerPlain",
    "FcaStage",
    "add_forward_cross_attention",
    "checkpoint_filter_fn",
    "create_dense_backbone",
    "load_official",
]
